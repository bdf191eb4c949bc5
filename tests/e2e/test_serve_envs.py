"""Two versions of one model, trained under two scikit-learn releases, served side by side by ONE
``modelpod serve``: each in its own environment built from the pod's lock, offline from a wheel
cache, each answering exactly as its training environment did. A third pod pins a package with no
wheel: only that model fails, naming the package and the fix. A second server reuses the envs.

Training environments are real venvs holding one scikit-learn release (``envwheels.SKLEARN_RELEASES``,
neither the server's) over the server's other packages, made once per machine under
``~/.cache/modelpod-tests/train-envs``; each trains, predicts and packs there, so each pod's lock
is that environment's. The wheels come from PyPI once (``tests/envwheels.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from envwheels import CACHE, SKLEARN_RELEASES, wheel_cache
from servutil import PYTHON, ServeProcess

from modelpod.serving.envbuild import RECORD, EnvCache, lock_key
from modelpod.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.pypi, pytest.mark.timeout(1200)]

TRAIN = r"""
import json, sys
from pathlib import Path
import numpy as np, sklearn, skops.io as sio
from sklearn.linear_model import LogisticRegression
from modelpod.packing import pack
from modelpod.store import Store

work, home, packs = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])  # [[name, requirements]]
rng = np.random.default_rng(7)
x = rng.normal(size=(300, 4))
y = (x[:, 0] + 0.5 * x[:, 1] ** 2 - x[:, 2] > 0.3).astype(np.int64)
model = LogisticRegression(C=0.7, max_iter=500).fit(x, y)
sio.dump(model, work / "model.skops")
test = np.random.default_rng(11).normal(size=(64, 4))
recs = [pack(work / "model.skops", name, Store(home), sample=x[:8], outputs=["label", "probabilities"],
             requirements=requirements) for name, requirements in packs]
print(json.dumps({"sklearn": sklearn.__version__, "version": recs[0].version, "x": test.tolist(),
                  "label": model.predict(test).tolist(), "probabilities": model.predict_proba(test).tolist()}))
"""


def training_env(release: str, wheels: Path) -> Path:
    """A venv with scikit-learn ``release`` in its own site-packages, the server's packages after it."""
    server_site = str(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    tag = hashlib.sha256(f"{release}\0{server_site}\0{sys.version}".encode()).hexdigest()[:12]
    root = CACHE / "train-envs" / f"sklearn-{release}-{tag}"
    python: Path = root / "bin" / "python"
    if (root / "ready").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(root)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--find-links", str(wheels), "--disable-pip-version-check", "--quiet",
                    f"scikit-learn=={release}"], check=True)
    own_site = next(root.glob("lib/python*/site-packages"))
    # Processed after the venv's own site-packages, so its scikit-learn shadows the server's.
    (own_site / "zz_modelpod_tests_server.pth").write_text(f"import site; site.addsitedir({server_site!r})\n")
    (root / "ready").write_text("ok\n")
    return python


@dataclass
class Trained:
    sklearn: str
    version: int
    x: list[list[float]]
    label: list[int]
    probabilities: list[list[float]]


def train(python: Path, work: Path, home: Path, packs: list[tuple[str, Path | None]],
          extra_path: Path | None = None) -> Trained:
    """Train in ``python``'s environment and pack the model once per (name, requirements file)."""
    work.mkdir(parents=True)
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    spec = json.dumps([[name, str(reqs) if reqs else None] for name, reqs in packs])
    proc = subprocess.run([str(python), "-c", TRAIN, str(work), str(home), spec],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Trained(**json.loads(proc.stdout.strip().splitlines()[-1]))


@dataclass
class Served:
    home: Path
    wheels: Path
    trained: list[Trained]
    proc: ServeProcess


def serve(home: Path, wheels: Path, *refs: str) -> ServeProcess:
    argv = [str(PYTHON), "-m", "modelpod", "--home", str(home), "serve", *refs, "--wheel-cache", str(wheels),
            "--no-grpc", "--host", "127.0.0.1", "--port", "0", "--json"]
    return ServeProcess(argv, env={"MODELPOD_LOG_LEVEL": "info"}, startup_s=900)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    wheels = wheel_cache()
    root = tmp_path_factory.mktemp("envs")
    home = root / "home"
    # broken:1 pins a package with no wheel anywhere: a distribution installed only where it was packed.
    fake = root / "fake-site"
    (fake / "mp_nowheel-1.0.dist-info").mkdir(parents=True)
    (fake / "mp_nowheel-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mp-nowheel\n"
                                                                "Version: 1.0\n")
    reqs = root / "requirements.txt"
    reqs.write_text("mp-nowheel==1.0\n")
    first, second = (training_env(r, wheels) for r in SKLEARN_RELEASES)
    trained = [train(first, root / "train-1", home, [("churn", None), ("broken", reqs)], fake),
               train(second, root / "train-2", home, [("churn", None)])]
    proc = serve(home, wheels, "churn:1", "churn:2", "broken:1")
    try:
        yield Served(home, wheels, trained, proc)
    finally:
        proc.stop()


def infer(url: str, version: int, x: list[list[float]]) -> dict[str, Any]:
    body = {"inputs": [{"name": "input-0", "shape": [len(x), 4], "datatype": "FP64",
                        "data": [v for row in x for v in row]}]}
    resp = httpx.post(f"{url}/v2/models/churn/versions/{version}/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return {o["name"]: o["data"] for o in resp.json()["outputs"]}


def test_each_version_answers_as_its_training_environment(served: Served) -> None:
    assert [t.sklearn for t in served.trained] == list(SKLEARN_RELEASES)
    assert [t.version for t in served.trained] == [1, 2]
    for t in served.trained:
        out = infer(served.proc.url, t.version, t.x)
        assert out["label"] == t.label
        flat = [v for row in t.probabilities for v in row]
        assert out["probabilities"] == flat  # bit for bit (JSON floats round-trip exactly)


def test_each_version_runs_in_its_own_environment(served: Served) -> None:
    store = Store(served.home)
    cache = EnvCache(served.home)
    for t in served.trained:
        manifest = store.get(f"churn:{t.version}").manifest
        assert f"scikit-learn=={t.sklearn}" in manifest.requirements  # the pack recorded its env's lock
        env = cache.get(lock_key(manifest.requirements))
        assert env is not None, f"no environment built for churn:{t.version}"
        got = subprocess.run([str(env.python), "-I", "-c", "import sklearn; print(sklearn.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert got == t.sklearn
    # The replicas answering are processes of those interpreters, children of the one server.
    pythons = set()
    for pid in _children(served.proc.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            pythons.add(fh.read().split(b"\0")[0].decode())
    wanted = {str(e.python) for e in cache.list() if e.record.get("pins")}
    assert wanted <= pythons, (wanted, pythons)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def test_an_unbuildable_pin_fails_only_that_model(served: Served) -> None:
    url = served.proc.url
    models = {m["name"]: m for m in served.proc.info["models"]}
    reason = models["broken"]["reason"]
    assert models["broken"]["state"] == "UNAVAILABLE"
    assert "mp-nowheel==1.0" in reason and "wheel cache" in reason and "repack" in reason, reason
    assert httpx.get(f"{url}/v2/models/broken/ready").status_code == 503
    index = {(m["name"], m.get("version")): m for m in httpx.post(f"{url}/v2/repository/index", json={}).json()}
    assert "mp-nowheel" in index[("broken", "1")]["reason"]
    for t in served.trained:  # the others serve
        assert httpx.get(f"{url}/v2/models/churn/versions/{t.version}/ready").status_code == 200
    assert not any(p.name.startswith(".staging-") for p in (served.home / "envs").iterdir())


def test_env_cli_lists_shows_and_builds(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    from modelpod.cli import main

    home = ["--home", str(served.home)]
    assert main([*home, "env", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(p for r in rows for p in r["pods"]) == ["churn:1", "churn:2"]
    assert all(r["size_bytes"] > 1_000_000 for r in rows)
    assert main([*home, "env", "show", "churn:1"]) == 0
    text = capsys.readouterr().out
    assert "its own environment" in text and f"scikit-learn=={SKLEARN_RELEASES[0]}" in text and "built at" in text
    assert main([*home, "env", "build", "churn:2", "--wheel-cache", str(served.wheels), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["built"] is False
    assert main([*home, "env", "build", "broken:1", "--wheel-cache", str(served.wheels)]) == 2
    assert "mp-nowheel==1.0" in capsys.readouterr().err


def test_a_second_server_reuses_the_environments(served: Served) -> None:
    cache = EnvCache(served.home)
    before = {e.key: (e.path / RECORD).stat().st_mtime_ns for e in cache.list()}
    served.proc.stop()
    again = serve(served.home, served.wheels, "churn:1", "churn:2")
    try:
        for t in served.trained:
            assert infer(again.url, t.version, t.x)["label"] == t.label
        ready = [json.loads(line) for line in again.stderr if "own environment ready" in line]
        assert len(ready) == 2 and not any(r.get("built") for r in ready), ready
    finally:
        again.stop()
    assert {e.key: (e.path / RECORD).stat().st_mtime_ns for e in cache.list()} == before
