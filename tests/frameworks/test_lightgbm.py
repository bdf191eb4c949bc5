from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fwutil import Check, sig

from modelpod.cli import main
from modelpod.errors import FrameworkError
from modelpod.frameworks import detect
from modelpod.frameworks import lightgbm as adapter
from modelpod.packing import pack
from modelpod.store import Store


def test_pack_verify_roundtrip_predict(store: Store, check_pod: Check,
                                       lgb_model: tuple[Path, np.ndarray, Any]) -> None:
    path, x, booster = lgb_model
    assert detect(path) == "lightgbm"
    rec = pack(path, "lgb", store)
    assert sig(rec) == {"inputs": [("input-0", "FP64", [-1, 5])], "outputs": [("output-0", "FP64", [-1])]}
    x = x.astype(np.float64)  # LightGBM pods take FP64 (its thresholds are doubles)
    check_pod(rec, x, {"output-0": booster.predict(x)})


def test_cli_pack_json_with_raw_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str], check_pod: Check,
                                       store: Store, lgb_model: tuple[Path, np.ndarray, Any]) -> None:
    path, x, booster = lgb_model
    code = main(["--home", str(store.home), "pack", str(path), "--name", "lgb", "--option", "raw_score=true",
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["framework"] == "lightgbm"
    x = x.astype(np.float64)
    check_pod(store.get("lgb"), x, {"output-0": booster.predict(x, raw_score=True)})


def test_detect_reads_the_first_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("trees are nice\n")
    assert not adapter.detect(notes)


def test_damaged_model_is_one_line_naming_the_file(tmp_path: Path, store: Store) -> None:
    bad = tmp_path / "broken.txt"
    bad.write_text("tree\nversion=v4\nnum_class=banana\n")
    with pytest.raises(FrameworkError) as info:
        pack(bad, "lgb", store)
    assert "broken.txt" in str(info.value) and "\n" not in str(info.value)
    assert store.list() == []


def test_wrong_framework_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                lgb_model: tuple[Path, np.ndarray, Any]) -> None:
    path, _, _ = lgb_model
    code = main(["--home", str(tmp_path / "home"), "pack", str(path), "--name", "m", "--framework", "xgboost"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--framework xgboost expects" in err and "lightgbm" in err


def test_float64_training_gets_an_fp64_signature(tmp_path: Path, store: Store, check_pod: Check) -> None:
    """Values closer together than float32 can tell apart: FP32 inputs would cross the thresholds."""
    import lightgbm as lgb

    rng = np.random.default_rng(5)
    x = 1.0 + rng.integers(0, 1000, size=(400, 2)) * 1e-9  # float64 steps of 1e-9 around 1.0
    y = (x[:, 0] > 1.0 + 500e-9).astype(float)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "min_data_in_leaf": 5,
                         "num_threads": 1}, lgb.Dataset(x, label=y), num_boost_round=5)
    booster.save_model(str(tmp_path / "m.txt"))
    rec = pack(tmp_path / "m.txt", "lgb64", store)
    assert sig(rec)["inputs"] == [("input-0", "FP64", [-1, 2])]
    want = booster.predict(x)
    assert not np.allclose(booster.predict(x.astype(np.float32)), want)  # the data really needs 64 bits
    check_pod(rec, x, {"output-0": want}, rtol=0, atol=0)


def test_classifier_outputs_and_class_labels(tmp_path: Path, store: Store, check_pod: Check) -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    clf = lgb.LGBMClassifier(n_estimators=5, num_leaves=4, verbose=-1, n_jobs=1).fit(x, y)
    clf.booster_.save_model(str(tmp_path / "clf.txt"))
    rec = pack(tmp_path / "clf.txt", "clf", store, outputs="label,probabilities")
    assert sig(rec)["outputs"] == [("label", "INT64", [-1]), ("probabilities", "FP64", [-1, 3])]
    assert rec.manifest.signature.parameters["class_labels"] == [0, 1, 2]
    check_pod(rec, x, {"label": clf.predict(x), "probabilities": clf.predict_proba(x)}, rtol=0, atol=1e-12)
