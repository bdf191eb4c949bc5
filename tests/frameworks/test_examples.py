from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.cli import main
from modelpod.store import Store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str) -> Any:
    """An examples/ script imported as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_models_and_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {m for m in sys.modules if m.startswith("modelpod_user_")}  # other tests' models may still be loaded
    module = example("make_models")
    home = tmp_path / "home"
    assert module.main(["--out", str(tmp_path / "out"), "--pack", "--home", str(home)]) == 0
    names = {r.name: r.manifest.framework for r in Store(home).list()}
    assert names == {"example-sklearn": "sklearn", "example-torch": "torch", "example-export": "torch",
                     "example-onnx": "onnx", "example-custom": "python"}
    capsys.readouterr()
    outputs = {}
    for name in ("example-torch", "example-export", "example-onnx"):
        assert main(["--home", str(home), "predict", name, "--input", str(tmp_path / "out" / "sample.npy"),
                     "--json"]) == 0
        outputs[name] = np.array(json.loads(capsys.readouterr().out)["outputs"][0]["data"])
    # One trained MLP, three formats: the same predictions.
    np.testing.assert_allclose(outputs["example-onnx"], outputs["example-torch"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["example-export"], outputs["example-torch"], rtol=1e-5, atol=1e-5)
    assert not [m for m in sys.modules if m.startswith("modelpod_user_") and m not in before]


def test_tabular_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = example("tabular")
    home = tmp_path / "home"
    assert module.main(["--out", str(tmp_path / "out"), "--pack", "--home", str(home)]) == 0
    rec = Store(home).get("churn-table")
    assert [(t.name, t.datatype) for t in rec.manifest.signature.inputs] == [
        ("tenure", "FP64"), ("spend", "FP64"), ("region", "BYTES"), ("plan", "BYTES")]
    assert rec.manifest.signature.parameters["class_labels"] == ["churn", "stay"]
    (tmp_path / "rows.jsonl").write_text('{"tenure": 2, "spend": null, "region": "east", "plan": "pro"}\n'
                                         '{"tenure": 50, "spend": 80.0, "region": "mars", "plan": "pro"}\n')
    capsys.readouterr()
    assert main(["--home", str(home), "predict", "churn-table", "--input", str(tmp_path / "rows.jsonl"),
                 "--json"]) == 0
    out = {o["name"]: o["data"] for o in json.loads(capsys.readouterr().out)["outputs"]}
    assert out["label"] == ["churn", "stay"]
