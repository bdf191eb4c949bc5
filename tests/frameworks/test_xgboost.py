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
from modelpod.frameworks import xgboost as adapter
from modelpod.packing import pack
from modelpod.store import Store


@pytest.mark.parametrize("filename", ["model.json", "model.ubj"])
def test_pack_verify_roundtrip_predict(filename: str, store: Store, check_pod: Check,
                                       xgb_model: tuple[Path, np.ndarray, Any]) -> None:
    d, x, booster = xgb_model
    assert detect(d / filename) == "xgboost"
    rec = pack(d / filename, "xgb", store)  # the file carries the feature count: no sample needed
    assert rec.manifest.framework == "xgboost"
    assert sig(rec) == {"inputs": [("input-0", "FP32", [-1, 5])], "outputs": [("output-0", "FP32", [-1])]}
    check_pod(rec, x, {"output-0": booster.inplace_predict(x)})


def test_cli_pack_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       xgb_model: tuple[Path, np.ndarray, Any]) -> None:
    d, _, _ = xgb_model
    code = main(["--home", str(tmp_path / "home"), "pack", str(d / "model.ubj"), "--name", "xgb", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["framework"] == "xgboost" and out["version"] == 1


def test_margin_option(store: Store, check_pod: Check, xgb_model: tuple[Path, np.ndarray, Any]) -> None:
    d, x, booster = xgb_model
    rec = pack(d / "model.json", "xgb", store, options={"predict_type": "margin", "threads": "1"})
    check_pod(rec, x, {"output-0": booster.inplace_predict(x, predict_type="margin")})


def test_other_json_is_not_xgboost(tmp_path: Path) -> None:
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"learning_rate": 0.1, "note": "mentions learner later"}))
    assert not adapter.detect(other)
    with pytest.raises(FrameworkError, match="cannot tell the framework"):
        detect(other)


def test_damaged_model_is_one_line_naming_the_file(tmp_path: Path, store: Store) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"learner": {"this is": not json')
    with pytest.raises(FrameworkError) as info:
        pack(bad, "xgb", store)
    assert "broken.json" in str(info.value) and "\n" not in str(info.value)
    assert store.list() == []


@pytest.mark.parametrize("classes", [2, 3])
def test_classifier_answers_like_predict_and_adds_outputs(tmp_path: Path, store: Store, check_pod: Check,
                                                           classes: int) -> None:
    import xgboost as xgb

    rng = np.random.default_rng(classes)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + ((x[:, 1] > 0.5).astype(int) if classes == 3 else 0)
    clf = xgb.XGBClassifier(n_estimators=5, max_depth=2, n_jobs=1).fit(x, y)
    clf.save_model(tmp_path / "clf.json")
    rec = pack(tmp_path / "clf.json", "clf", store)
    # By default the pod answers like clf.predict: labels, not probabilities.
    assert sig(rec)["outputs"] == [("output-0", "INT64", [-1])]
    assert rec.manifest.signature.parameters["class_labels"] == list(range(classes))
    check_pod(rec, x, {"output-0": clf.predict(x)}, rtol=0, atol=0)
    both = pack(tmp_path / "clf.json", "clf2", store, outputs=["label", "probabilities"])
    assert sig(both)["outputs"] == [("label", "INT64", [-1]), ("probabilities", "FP32", [-1, classes])]
    check_pod(both, x, {"label": clf.predict(x), "probabilities": clf.predict_proba(x)})


def test_outputs_that_do_not_fit_the_objective(tmp_path: Path, store: Store) -> None:
    import xgboost as xgb

    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    xgb.XGBRegressor(n_estimators=2).fit(x, x[:, 0]).save_model(tmp_path / "reg.json")
    with pytest.raises(FrameworkError, match="need a classifier.*reg:squarederror"):
        pack(tmp_path / "reg.json", "reg", store, outputs=["label"])
    with pytest.raises(FrameworkError, match="--outputs colour: xgboost pods can answer label"):
        pack(tmp_path / "reg.json", "reg", store, outputs=["colour"])
