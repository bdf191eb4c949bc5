"""XGBoost: JSON and UBJSON model files written by ``Booster.save_model``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import copy_model_file, int_option, peek, pick_file, unreadable
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec

NAME = "xgboost"
EXTRA = "xgboost"
IMPORTS = ("xgboost",)
DISTRIBUTIONS = ("xgboost",)
EXPECTED = "an XGBoost model (.json or .ubj from Booster.save_model)"
PREDICT_TYPES = ("value", "margin")

# Booster.save_model writes {"learner": ...} first; other JSON files (configs, tokenizers) do not.
_JSON_HEAD = re.compile(rb'^\s*\{\s*"learner"\s*:')


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == ".json":
        return bool(_JSON_HEAD.match(peek(path, 64)))
    if path.suffix == ".ubj":
        head = peek(path, 32)
        return head.startswith(b"{") and b"learner" in head
    return False


def _booster(path: Path, threads: int | None) -> Any:
    import xgboost as xgb

    try:
        booster = xgb.Booster(model_file=str(path))
    except (xgb.core.XGBoostError, ValueError, OSError) as exc:
        raise unreadable(path, EXPECTED, exc) from None
    if threads:
        booster.set_param({"nthread": threads})
    return booster


def _predict(booster: Any, x: np.ndarray[Any, Any], predict_type: str) -> np.ndarray[Any, Any]:
    return np.asarray(booster.inplace_predict(x, predict_type=predict_type))


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    predict_type = str(request.options.get("predict_type", "value"))
    if predict_type not in PREDICT_TYPES:
        raise FrameworkError(f"option predict_type={predict_type!r}: use one of {', '.join(PREDICT_TYPES)}")
    booster = _booster(file, None)
    n = int(booster.num_features())
    # The file records the feature count; one zero row tells the output's type and width.
    probe = _predict(booster, np.zeros((1, n), np.float32), predict_type)
    signature = Signature(
        (TensorSpec("input-0", "FP32", (-1, n)),),
        (TensorSpec.of("output-0", probe),),
    )
    rel = copy_model_file(file, dest)
    return Packed(signature=signature, options={"file": rel, "predict_type": predict_type})


class XGBoostModel(Model):
    def load(self) -> None:
        assert self.pod is not None
        opts: Mapping[str, Any] = self.pod.manifest.options
        self.booster = _booster(self.pod.file(str(opts["file"])), int_option(opts, "threads"))
        self.predict_type = str(opts.get("predict_type", "value"))
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        (x,) = inputs.values()
        return {"output-0": _predict(self.booster, x, self.predict_type)}

    def unload(self) -> None:
        self.__dict__.pop("booster", None)
        super().unload()


def load(pod: Pod) -> Model:
    return XGBoostModel(pod)
