from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelpod.errors import FrameworkError, SignatureError, UsageError
from modelpod.packing import pack, read_sample
from modelpod.store import Store


def test_pack_records_signature_requirements_and_lineage(
    store: Store, sklearn_model: tuple[Path, np.ndarray, object]
) -> None:
    path, sample, _ = sklearn_model
    parent = pack(path, "lr", store, sample=sample)
    rec = pack(path, "lr", store, sample=sample, labels={"team": "ml"}, parent="lr:1", metrics={"auc": 0.9})
    m = rec.manifest
    assert m.framework == "sklearn" and m.python.count(".") == 1
    assert [t.to_dict() for t in m.signature.inputs] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 20]}]
    assert m.signature.outputs[0].datatype == "INT64"
    pins = {r.split("==")[0].lower(): r for r in m.requirements}
    import sklearn

    assert pins["scikit-learn"] == f"scikit-learn=={sklearn.__version__}"
    assert "numpy" in pins and "scipy" in pins  # transitive dependencies are locked too
    assert m.lineage["parent"] == parent.digest and m.lineage["metrics"] == {"auc": 0.9}
    assert m.labels == {"team": "ml"}


def test_sample_that_does_not_fit_leaves_nothing(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    path, _, _ = sklearn_model
    with pytest.raises(SignatureError, match="sample does not fit"):
        pack(path, "lr", store, sample=np.zeros((2, 7), np.float32))
    assert store.list() == []
    assert list(store.tmp.iterdir()) == [] and list(store.blobs.iterdir()) == []


def test_no_sample_no_signature_is_a_clear_error(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    with pytest.raises(SignatureError, match="--sample"):
        pack(sklearn_model[0], "lr", store)
    assert store.list() == []


def test_wrong_framework_and_unknown_formats(store: Store, tmp_path: Path,
                                             sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    with pytest.raises(FrameworkError, match="unknown framework"):
        pack(sklearn_model[0], "lr", store, framework="caffe")
    odd = tmp_path / "model.weird"
    odd.write_bytes(b"\x00\x01")
    with pytest.raises(FrameworkError, match="--framework"):
        pack(odd, "lr", store)
    with pytest.raises(UsageError, match="no such file"):
        pack(tmp_path / "missing.skops", "lr", store)
    assert store.list() == []


def test_read_sample_forms(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", x=a, y=a[:, :1])
    (tmp_path / "c.json").write_text(json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": a.ravel().tolist()}]}))
    assert list(read_sample(tmp_path / "a.npy", ["inp"])) == ["inp"]
    assert set(read_sample(tmp_path / "b.npz", [])) == {"x", "y"}
    np.testing.assert_array_equal(read_sample(tmp_path / "c.json", [])["x"], a)
    with pytest.raises(UsageError):
        read_sample(tmp_path / "nope.npy", [])


def _wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A minimal pure-Python wheel, enough for pip's resolver."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name}/__init__.py": "",
        f"{info}/METADATA": meta,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_requirements_file_is_resolved_to_exact_pins(tmp_path: Path) -> None:
    from modelpod.locking import lock_file

    def lock_requirements(path: Path) -> list[str]:
        return sorted(lock_file(path).values(), key=str.lower)

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "mp_alpha", "1.0", ("mp-beta>=2",))
    _wheel(wheels, "mp_beta", "1.5")
    _wheel(wheels, "mp_beta", "2.1")
    req = tmp_path / "requirements.txt"
    req.write_text(f"--no-index\n--find-links {wheels}\nmp-alpha\n")
    assert [p.lower().replace("_", "-") for p in lock_requirements(req)] == ["mp-alpha==1.0", "mp-beta==2.1"]
    req.write_text(f"--no-index\n--find-links {wheels}\nmp-alpha\nmp-beta<2\n")
    with pytest.raises(UsageError, match="cannot resolve"):
        lock_requirements(req)
