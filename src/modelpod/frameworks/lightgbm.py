"""LightGBM: text model files written by ``Booster.save_model``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import copy_model_file, int_option, peek, pick_file, unreadable
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec

NAME = "lightgbm"
EXTRA = "lightgbm"
IMPORTS = ("lightgbm",)
DISTRIBUTIONS = ("lightgbm",)
EXPECTED = "a LightGBM text model (Booster.save_model)"
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


def detect(path: Path) -> bool:
    # A LightGBM text model's first line is exactly "tree"; the suffix is the user's choice.
    return path.is_file() and peek(path, 8).split(b"\n", 1)[0].rstrip(b"\r") == b"tree"


def _booster(path: Path) -> Any:
    import lightgbm as lgb

    try:
        return lgb.Booster(model_file=str(path))
    except (lgb.basic.LightGBMError, ValueError, OSError) as exc:
        raise unreadable(path, EXPECTED, exc) from None


def _flag(options: Mapping[str, Any], key: str) -> bool:
    value = options.get(key, False)
    if isinstance(value, bool):
        return value
    try:
        return _BOOL[str(value).lower()]
    except KeyError:
        raise FrameworkError(f"option {key}={value!r}: expected true or false") from None


def _predict(booster: Any, x: np.ndarray[Any, Any], raw_score: bool, threads: int | None) -> np.ndarray[Any, Any]:
    params = {"num_threads": threads} if threads else {}
    return np.asarray(booster.predict(x, raw_score=raw_score, **params))


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    raw_score = _flag(request.options, "raw_score")
    booster = _booster(file)
    n = int(booster.num_feature())
    probe = _predict(booster, np.zeros((1, n), np.float32), raw_score, 1)
    signature = Signature(
        (TensorSpec("input-0", "FP32", (-1, n)),),
        (TensorSpec.of("output-0", probe),),
    )
    rel = copy_model_file(file, dest)
    return Packed(signature=signature, options={"file": rel, "raw_score": raw_score})


class LightGBMModel(Model):
    def load(self) -> None:
        assert self.pod is not None
        opts: Mapping[str, Any] = self.pod.manifest.options
        self.booster = _booster(self.pod.file(str(opts["file"])))
        self.raw_score = _flag(opts, "raw_score")
        self.threads = int_option(opts, "threads")
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        (x,) = inputs.values()
        return {"output-0": _predict(self.booster, x, self.raw_score, self.threads)}

    def unload(self) -> None:
        self.__dict__.pop("booster", None)
        super().unload()


def load(pod: Pod) -> Model:
    return LightGBMModel(pod)
