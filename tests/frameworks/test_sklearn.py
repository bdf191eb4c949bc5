from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import Check, assert_store_empty, evil_pickle, sig

from modelpod.cli import main
from modelpod.errors import FrameworkError, UnsafeModelError
from modelpod.frameworks import sklearn as adapter
from modelpod.packing import pack
from modelpod.pod import Pod
from modelpod.store import Store


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, Any]
                  ) -> tuple[Path, np.ndarray, Any]:
    _, x, est = sklearn_model
    path = tmp_path_factory.mktemp("pickled") / "model.pkl"
    with path.open("wb") as fh:
        pickle.dump(est, fh)
    return path, x, est


def test_skops_via_cli(tmp_path: Path, store: Store, check_pod: Check, capsys: pytest.CaptureFixture[str],
                       sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    path, x, est = sklearn_model
    np.save(tmp_path / "x.npy", x)
    code = main(["--home", str(store.home), "pack", str(path), "--name", "lr", "--sample", str(tmp_path / "x.npy"),
                 "--option", "method=predict_proba", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["framework"] == "sklearn"
    rec = store.get("lr")
    assert sig(rec) == {"inputs": [("input-0", "FP32", [-1, 20])], "outputs": [("output-0", "FP32", [-1, 2])]}
    check_pod(rec, x, {"output-0": est.predict_proba(x)})


def test_pickle_refused_without_opt_in(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       pickled_model: tuple[Path, np.ndarray, Any]) -> None:
    path, x, _ = pickled_model
    np.save(tmp_path / "x.npy", x)
    home = tmp_path / "home"
    code = main(["--home", str(home), "pack", str(path), "--name", "lr", "--sample", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model.pkl" in err and "runs code when it is loaded" in err and "--allow-pickle" in err
    assert_store_empty(Store(home))


def test_benign_pickle_with_opt_in(store: Store, check_pod: Check, pickled_model: tuple[Path, np.ndarray, Any]) -> None:
    path, x, est = pickled_model
    rec = pack(path, "lr", store, sample=x, allow_pickle=True)
    assert rec.manifest.allow_pickle
    check_pod(rec, x, {"output-0": est.predict(x)})
    pod = store.open(rec.ref)
    model = adapter.load(Pod(pod.path, replace(pod.manifest, allow_pickle=False)))
    with pytest.raises(UnsafeModelError, match="did not opt in.*--allow-pickle"):
        model.load()


def test_malicious_pickle_refused_by_the_scan(tmp_path: Path, store: Store) -> None:
    path = evil_pickle(tmp_path / "model.pkl")
    with pytest.raises(UnsafeModelError, match="system.*arbitrary code"):
        pack(path, "evil", store, allow_pickle=True, sample=np.zeros((1, 2), np.float32))
    assert_store_empty(store)
    assert list(store.blobs.iterdir()) == []


def test_joblib_arrays_cannot_be_scanned(tmp_path: Path, store: Store,
                                        sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    import joblib

    _, x, est = sklearn_model
    joblib.dump(est, tmp_path / "model.joblib")
    with pytest.raises(UnsafeModelError, match="joblib stores arrays.*skops"):
        pack(tmp_path / "model.joblib", "lr", store, sample=x, allow_pickle=True)
    assert_store_empty(store)


def test_wrong_framework_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    path, _, _ = sklearn_model
    code = main(["--home", str(tmp_path / "home"), "pack", str(path), "--name", "lr", "--framework", "onnx"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "not an ONNX model" in err and "looks like a model for --framework sklearn" in err


def test_sample_that_does_not_fit_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    path, _, _ = sklearn_model
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    home = tmp_path / "home"
    code = main(["--home", str(home), "pack", str(path), "--name", "lr", "--sample", str(tmp_path / "bad.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not fit" in err
    assert_store_empty(Store(home))


def test_damaged_skops_is_one_line(tmp_path: Path, store: Store) -> None:
    bad = tmp_path / "broken.skops"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FrameworkError) as info:
        pack(bad, "lr", store, sample=np.zeros((1, 2), np.float32))
    assert "broken.skops" in str(info.value) and "\n" not in str(info.value)
    assert_store_empty(store)


def test_skops_is_imported_without_torch_or_pytest() -> None:
    # skops lists sklearn's estimators on import, which walks every sklearn package; that must
    # not drag torch (hundreds of MB) or pytest into a serving process.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from modelpod.frameworks.sklearn import skops_io\n"
        "sio = skops_io()\n"
        "from skops.io import _trusted_types as tt\n"
        "assert 'sklearn.linear_model._logistic.LogisticRegression' in tt.SKLEARN_ESTIMATOR_TYPE_NAMES\n"
        "print(sorted(m for m in ('torch', 'pytest') if m in sys.modules))\n"
        "import pytest, sklearn.externals.array_api_compat  # the block ended with the import\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
