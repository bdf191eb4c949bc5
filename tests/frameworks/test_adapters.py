"""What every adapter shares: the contract, missing extras, and detection across formats."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.errors import FrameworkError, MissingExtraError
from modelpod.frameworks import FRAMEWORKS, Adapter, detect, module, require


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_every_adapter_has_the_contract(name: str) -> None:
    mod = module(name)
    assert name == mod.NAME
    assert isinstance(mod, Adapter)  # the typed Protocol (mypy checks the signatures too)
    assert isinstance(mod.TABLES, bool) and isinstance(mod.IMPORTS, tuple)


@pytest.mark.parametrize("name", [n for n in FRAMEWORKS if module(n).IMPORTS])
def test_missing_framework_names_the_extra(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    missing = module(name).IMPORTS[0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real(n, *a))
    with pytest.raises(MissingExtraError, match=rf"pip install 'modelpod\[{module(name).EXTRA}\]'"):
        require(name)


def test_detection_never_imports_the_framework(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "m.json").write_text('{"learner": {}}')
    code = (
        "import sys; from pathlib import Path; from modelpod.frameworks import detect\n"
        f"print(detect(Path({str(tmp_path / 'm.json')!r})))\n"
        "heavy = {'xgboost', 'lightgbm', 'torch', 'tensorflow', 'onnxruntime', 'transformers', 'sklearn', 'keras'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["xgboost", "[]"]


def test_detect_table(tmp_path: Path, xgb_model: tuple[Path, np.ndarray, Any],
                      lgb_model: tuple[Path, np.ndarray, Any], torch_models: dict[str, Any],
                      hf_models: dict[str, Path], sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    code = tmp_path / "code"
    code.mkdir()
    (code / "serve.py").write_text("import modelpod\n")
    cases = {
        xgb_model[0] / "model.json": "xgboost", xgb_model[0] / "model.ubj": "xgboost",
        lgb_model[0]: "lightgbm", tmp_path / "m.onnx": "onnx",
        torch_models["dir"] / "script.pt": "torch", torch_models["dir"] / "program.pt2": "torch",
        torch_models["dir"] / "module.pt": "torch", hf_models["cls"]: "transformers",
        sklearn_model[0]: "sklearn", code: "python",
    }
    assert {str(p): detect(p) for p in cases} == {str(p): fw for p, fw in cases.items()}
    # The tokenizer and model configs of a transformers directory are not XGBoost models.
    with pytest.raises(FrameworkError, match="--framework"):
        detect(hf_models["cls"] / "config.json")
