"""The one input check (modelpod.inputs) as in-process predict, ``modelpod predict`` and batch use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelpod
from modelpod.cli import main
from modelpod.errors import InvalidRequestError
from modelpod.inputs import WIDENINGS, accepts, check_inputs, check_shape
from modelpod.pod import Signature, TensorSpec

SIG = Signature((TensorSpec("small", "INT8", (-1,)), TensorSpec("big", "INT64", (-1,)),
                 TensorSpec("f", "FP64", (-1, 2))))


def ok(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"small": np.array([1], np.int8), "big": np.array([2], np.int64),
                            "f": np.array([[0.5, 1.5]], np.float64)}
    return {**base, **over}


def test_the_widening_table_is_integers_of_the_same_signedness_only() -> None:
    assert WIDENINGS["INT8"] == ("INT16", "INT32", "INT64") and WIDENINGS["UINT32"] == ("UINT64",)
    assert accepts("INT64", "INT32") and accepts("UINT16", "UINT8") and accepts("FP32", "FP32")
    for expected, received in (("FP64", "FP32"), ("FP64", "INT64"), ("INT8", "INT64"), ("INT64", "UINT8"),
                               ("FP32", "FP16"), ("INT32", "BOOL")):
        assert not accepts(expected, received), (expected, received)


def test_narrower_integers_are_widened() -> None:
    out = check_inputs(SIG, ok(big=np.array([-3], np.int16)))
    assert out["big"].dtype == np.int64 and out["big"].tolist() == [-3]


@pytest.mark.parametrize("over, fragment", [
    ({"small": np.array([300], np.int64)}, "expected datatype INT8, received INT64"),  # never wraps to 44
    ({"small": [300]}, "does not fit datatype INT8"),
    ({"small": [1.5]}, "must be integers"),
    ({"small": [True]}, "must be integers"),
    ({"f": np.array([[1, 2]], np.float32)}, "expected datatype FP64, received FP32"),
    ({"f": np.array([[1, 2]], np.int64)}, "expected datatype FP64, received INT64"),
    ({"f": [["1.5", 2.0]]}, "must be numbers"),
    ({"f": [[True, 2.0]]}, "must be numbers"),
    ({"f": np.zeros((0, 2))}, "zero rows"),
    ({"f": np.zeros((1, 3))}, "does not match the signature"),
    ({"nope": [1]}, "no input 'nope'"),
])
def test_refusals_name_the_input_and_the_reason(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        check_inputs(SIG, ok(**over), model="m")


def test_plain_values_fit_the_signature() -> None:
    out = check_inputs(SIG, {"small": [1, -2], "big": [7, 8], "f": [[1, 2.5], [3, 4]]})
    assert out["small"].dtype == np.int8 and out["f"].dtype == np.float64 and out["f"].shape == (2, 2)


def test_missing_inputs() -> None:
    with pytest.raises(InvalidRequestError, match="missing input"):
        check_inputs(SIG, {"small": [1]})


@pytest.mark.parametrize("shape, fragment", [((2**62, 0), "larger than any request"), ((1,) * 65, "at most 64"),
                                             ((0, 8), "zero rows"), ((2**30, 2**30, 2**30), "more than any")])
def test_impossible_shapes(shape: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        check_shape("x", shape)


def test_nonfinite_policy() -> None:
    nan = ok(f=np.array([[np.nan, 1.0]]))
    assert np.isnan(check_inputs(SIG, nan)["f"][0, 0])  # default: passed to the model
    with pytest.raises(InvalidRequestError, match="NaN or Infinity"):
        check_inputs(SIG, nan, nonfinite="reject")


def test_in_process_predict_checks_like_the_server(tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, Any]
                                                   ) -> None:
    path, sample, _ = sklearn_model
    settings = modelpod.Settings(home=tmp_path / "home")
    rec = modelpod.pack(path, "lr", settings=settings, sample=sample)
    model = modelpod.load(rec.ref, settings=settings)
    with pytest.raises(InvalidRequestError, match="zero rows"):
        model(sample[:0])
    with pytest.raises(InvalidRequestError, match="must be numbers"):
        model([["1.5"] * 20])
    assert model(sample.tolist())["output-0"].shape == (len(sample),)  # plain lists convert when they fit


def test_modelpod_predict_refuses_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    path, sample, _ = sklearn_model
    home = tmp_path / "home"
    assert main(["--home", str(home), "pack", str(path), "--name", "lr", "--sample", _npy(tmp_path, sample)]) == 0
    capsys.readouterr()
    cases = [
        ({"name": "input-0", "datatype": "FP64", "shape": [1, 20], "data": [0.5] * 20}, "expected datatype FP32"),
        ({"name": "input-0", "datatype": "FP32", "shape": [0, 20], "data": []}, "zero rows"),
        ({"name": "input-0", "datatype": "FP32", "shape": [1, 20], "data": [True] * 20}, "must be numbers"),
    ]
    for tensor, fragment in cases:
        req = tmp_path / "req.json"
        req.write_text(json.dumps({"inputs": [tensor]}))
        code = main(["--home", str(home), "predict", "lr", "--input", str(req)])
        _, err = capsys.readouterr()
        assert code == 2 and fragment in err and "Traceback" not in err, err
    # NaN into scikit-learn's LogisticRegression: the model's ValueError is the input's fault (exit 2).
    req.write_text('{"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 20], "data": [NaN'
                   + ", 0" * 19 + "]}]}")
    code = main(["--home", str(home), "predict", "lr", "--input", str(req)])
    _, err = capsys.readouterr()
    assert code == 2 and "refused the input" in err and "NaN" in err, err


def _npy(tmp_path: Path, sample: np.ndarray) -> str:
    np.save(tmp_path / "s.npy", sample)
    return str(tmp_path / "s.npy")
