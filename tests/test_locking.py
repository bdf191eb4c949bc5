"""Complete locks: what load + predict import, a custom pod's own requirements, extras' dependencies."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from podcode import LAZY_IMPORT, code_dir

from modelpod.locking import lock_file, walk
from modelpod.packing import pack
from modelpod.store import Store


def _names(pins: object) -> set[str]:
    return {str(p).split("==")[0].lower().replace("_", "-") for p in pins}  # type: ignore[attr-defined]


def test_walk_follows_dependencies() -> None:
    names = set(walk(["scikit-learn"]))
    assert {"scikit-learn", "numpy", "scipy", "joblib", "threadpoolctl"} <= names
    assert all("==" in p for p in walk(["scikit-learn"]).values())


def _dist(site: Path, name: str, version: str, *requires: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_walk_takes_the_dependencies_of_extras_a_package_is_required_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # alpha needs gamma and beta; gamma needs beta[fast], whose extra needs delta. beta is reached
    # without extras first: its extra's dependency must still be locked.
    site = tmp_path / "site"
    _dist(site, "mp-alpha", "1.0", "mp-gamma", "mp-beta")
    _dist(site, "mp-gamma", "1.0", "mp-beta[fast]")
    _dist(site, "mp-beta", "2.0", 'mp-delta; extra == "fast"')
    _dist(site, "mp-delta", "3.0")
    monkeypatch.syspath_prepend(str(site))
    assert walk(["mp-alpha"]) == {"mp-alpha": "mp-alpha==1.0", "mp-gamma": "mp-gamma==1.0",
                                  "mp-beta": "mp-beta==2.0", "mp-delta": "mp-delta==3.0"}
    assert "mp-delta" not in walk(["mp-beta"])
    assert "mp-delta" in walk(["mp-beta[fast]"])


@pytest.fixture(scope="module")
def table_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:  # type: ignore[type-arg]
    """A model fit on a DataFrame of two named columns: the sklearn adapter builds a DataFrame for it."""
    import pandas as pd
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"a": rng.normal(size=80), "b": rng.normal(size=80)})
    est = LogisticRegression().fit(frame, (frame["a"] > 0).astype(int))
    path = tmp_path_factory.mktemp("table") / "model.skops"
    sio.dump(est, path)
    sample = {"a": frame["a"].to_numpy()[:4], "b": frame["b"].to_numpy()[:4]}
    return path, sample


def test_multi_input_sklearn_pod_locks_pandas(store: Store, table_model: tuple[Path, dict[str, np.ndarray]]) -> None:  # type: ignore[type-arg]
    path, sample = table_model
    rec = pack(path, "table", store, sample=sample)
    assert "pandas" in _names(rec.manifest.requirements)
    # and the sample is kept in the pod, for the image's load check
    files = {f.path: f for f in rec.manifest.files}
    assert files["sample.json"].role == "config"
    kept = json.loads((store.open(rec.ref).path / "sample.json").read_text())
    assert [t["name"] for t in kept["inputs"]] == ["a", "b"]


def _custom(directory: Path, body: str, requirements: str | None = None, pyproject: str | None = None) -> Path:
    directory.mkdir()
    (directory / "model.py").write_text(textwrap.dedent(body))
    if requirements is not None:
        (directory / "requirements.txt").write_text(requirements)
    if pyproject is not None:
        (directory / "pyproject.toml").write_text(pyproject)
    return directory


_PLAIN = """
    import modelpod

    class Echo(modelpod.Model):
        def predict(self, x: list[float]) -> list[float]:
            return [v * 2 for v in x]
"""


def test_custom_pod_requirements_txt_is_locked(store: Store, tmp_path: Path) -> None:
    code = _custom(tmp_path / "echo", _PLAIN, requirements="threadpoolctl>=3  # used at run time\n")
    rec = pack(code, "echo", store)
    assert "threadpoolctl" in _names(rec.manifest.requirements)
    assert "numpy" in _names(rec.manifest.requirements)


def test_custom_pod_pyproject_dependencies_are_locked(store: Store, tmp_path: Path) -> None:
    code = _custom(tmp_path / "echo", _PLAIN, pyproject='[project]\nname = "echo"\ndependencies = ["joblib"]\n')
    assert "joblib" in _names(pack(code, "echo", store).manifest.requirements)


def test_what_the_custom_code_imports_at_load_is_locked(store: Store, tmp_path: Path) -> None:
    code = code_dir(tmp_path / "lazy", LAZY_IMPORT)
    rec = pack(code, "lazy", store)
    assert "threadpoolctl" in _names(rec.manifest.requirements)


def _wheel(directory: Path, name: str, version: str) -> None:
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_requirements_add_to_the_automatic_lock_and_no_auto_lock_replaces_it(
        store: Store, tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, object]) -> None:  # type: ignore[type-arg]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "mp_extra", "1.2")
    req = tmp_path / "requirements.txt"
    req.write_text(f"--no-index\n--find-links {wheels}\nmp-extra\n")
    path, sample, _ = sklearn_model
    added = _names(pack(path, "lr", store, sample=sample, requirements=req).manifest.requirements)
    assert {"mp-extra", "scikit-learn", "skops", "numpy"} <= added
    alone = _names(pack(path, "lr", store, sample=sample, requirements=req, auto_lock=False).manifest.requirements)
    assert alone == {"mp-extra"}


def test_lock_file_uses_this_environment_when_it_satisfies_the_file(tmp_path: Path) -> None:
    import threadpoolctl

    req = tmp_path / "requirements.txt"
    req.write_text("threadpoolctl>=1  # comment\n\n")
    assert lock_file(req) == {"threadpoolctl": f"threadpoolctl=={threadpoolctl.__version__}"}
