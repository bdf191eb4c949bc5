"""LightGBM: text model files written by ``Booster.save_model``.

A pod answers ``Booster.predict`` (``--option raw_score=true`` for raw scores); ``--outputs``
names several: ``label`` (as LGBMClassifier.predict: p > 0.5, or the most likely class),
``probabilities`` (one column per class, as predict_proba), ``raw`` and ``value``. Inputs are
FP64: LightGBM's thresholds are doubles, so 32-bit inputs could land on the other side of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import (
    chosen_outputs,
    class_outputs,
    copy_model_file,
    int_option,
    peek,
    pick_file,
    unreadable,
)
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec

NAME = "lightgbm"
EXTRA = "lightgbm"
IMPORTS = ("lightgbm",)
DISTRIBUTIONS = ("lightgbm",)
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
EXPECTED = "a LightGBM text model (Booster.save_model)"
OUTPUTS = {"label": "the predicted class", "probabilities": "one column per class", "raw": "raw scores",
           "value": "Booster.predict"}
_CLASSIFIERS = ("binary", "multiclass", "multiclassova")
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


def _objective(path: Path) -> tuple[str, int]:
    """(objective, number of classes) from the text model's header (read without parsing the trees)."""
    objective, classes = "", 1
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("Tree="):
                break
            key, _, value = line.strip().partition("=")
            if key == "objective":
                objective = value.split(" ")[0]
            elif key == "num_class" and value.isdigit():
                classes = int(value)
    return objective, (2 if objective == "binary" else classes)


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    raw_score = _flag(request.options, "raw_score")
    booster = _booster(file)
    objective, classes = _objective(file)
    outputs = chosen_outputs(request.outputs, OUTPUTS, NAME)
    if any(o in ("label", "probabilities") for o in outputs) and objective not in _CLASSIFIERS:
        raise FrameworkError(f"--outputs label/probabilities need a classifier; this model's objective is "
                             f"{objective or 'unknown'}")
    options: dict[str, Any] = {"raw_score": raw_score, "objective": objective}
    if outputs:
        options["outputs"] = outputs
    n = int(booster.num_feature())
    probe = _run(booster, np.zeros((1, n), np.float64), options, 1)
    params = {"class_labels": list(range(classes))} if objective in _CLASSIFIERS else {}
    signature = Signature(
        (TensorSpec("input-0", "FP64", (-1, n)),),
        tuple(TensorSpec.of(k, v) for k, v in probe.items()),
        params,
    )
    rel = copy_model_file(file, dest)
    return Packed(signature=signature, options={"file": rel, **options})


def _run(booster: Any, x: np.ndarray[Any, Any], options: Mapping[str, Any], threads: int | None) -> Batch:
    names = options.get("outputs") or ()
    if not names:
        return {"output-0": _predict(booster, x, _flag(options, "raw_score"), threads)}
    return class_outputs(names, lambda: _predict(booster, x, False, threads),
                         lambda: _predict(booster, x, True, threads), options.get("objective") in _CLASSIFIERS)


class LightGBMModel(Model):
    computes_only = True

    def load(self) -> None:
        assert self.pod is not None
        opts: Mapping[str, Any] = self.pod.manifest.options
        self.booster = _booster(self.pod.file(str(opts["file"])))
        self.options = dict(opts)
        self.threads = int_option(opts, "threads")
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        (x,) = inputs.values()
        return _run(self.booster, x, self.options, self.threads)

    def unload(self) -> None:
        self.__dict__.pop("booster", None)
        super().unload()


def load(pod: Pod) -> Model:
    return LightGBMModel(pod)
