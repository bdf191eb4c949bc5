"""XGBoost: JSON and UBJSON model files written by ``Booster.save_model``.

A model saved by ``XGBClassifier.save_model`` answers labels, as ``clf.predict`` does; a plain
Booster answers ``Booster.predict`` (probabilities for ``binary:logistic``). ``--outputs`` names
several outputs: ``label``, ``probabilities`` (one column per class, as ``predict_proba``),
``margin`` and ``value``. Classifiers record ``class_labels`` (0..K-1, as XGBoost encodes them).
Inputs are FP32: XGBoost compares features as 32-bit floats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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

NAME = "xgboost"
EXTRA = "xgboost"
IMPORTS = ("xgboost",)
DISTRIBUTIONS = ("xgboost",)
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
EXPECTED = "an XGBoost model (.json or .ubj from Booster.save_model)"
PREDICT_TYPES = ("value", "margin")
OUTPUTS = {"label": "the predicted class, as XGBClassifier.predict",
           "probabilities": "one column per class, as predict_proba", "margin": "raw margin",
           "value": "Booster.predict"}
# Objectives whose value is a probability (binary) or a row of class probabilities.
_PROBABILITY = ("binary:logistic", "multi:softprob")
_CLASSIFIERS = (*_PROBABILITY, "binary:hinge", "multi:softmax")  # their value is a class or probability

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


def _kind(booster: Any) -> tuple[str, int, bool]:
    """(objective, number of classes or 0, saved by the scikit-learn classifier)."""
    config = json.loads(booster.save_config())["learner"]
    objective = str(config["objective"]["name"])
    classes = int(config["learner_model_param"].get("num_class") or 0)
    if objective.startswith("binary:"):
        classes = 2
    try:
        wrapper = json.loads(booster.attr("scikit_learn") or "{}")
    except ValueError:
        wrapper = {}
    return objective, classes, isinstance(wrapper, dict) and wrapper.get("_estimator_type") == "classifier"


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    predict_type = str(request.options.get("predict_type", "value"))
    if predict_type not in PREDICT_TYPES:
        raise FrameworkError(f"option predict_type={predict_type!r}: use one of {', '.join(PREDICT_TYPES)}")
    booster = _booster(file, None)
    objective, classes, sklearn_classifier = _kind(booster)
    outputs = chosen_outputs(request.outputs, OUTPUTS, NAME)
    if any(o in ("label", "probabilities") for o in outputs) and objective not in _CLASSIFIERS:
        raise FrameworkError(f"--outputs label/probabilities need a classifier; this model's objective is {objective}")
    if "probabilities" in outputs and objective not in _PROBABILITY:
        raise FrameworkError(f"--outputs probabilities: objective {objective} gives no probabilities")
    options: dict[str, Any] = {"predict_type": predict_type, "objective": objective}
    if outputs:
        options["outputs"] = outputs
    elif sklearn_classifier and predict_type == "value" and objective in _CLASSIFIERS:
        options["outputs"] = ["label"]
        options["output_names"] = ["output-0"]  # answers like clf.predict, under the default name
    n = int(booster.num_features())
    # The file records the feature count; one zero row tells each output's type and width.
    probe = _run(booster, np.zeros((1, n), np.float32), options)
    params = {"class_labels": list(range(classes))} if objective in _CLASSIFIERS and classes else {}
    signature = Signature(
        (TensorSpec("input-0", "FP32", (-1, n)),),
        tuple(TensorSpec.of(k, v) for k, v in probe.items()),
        params,
    )
    rel = copy_model_file(file, dest)
    return Packed(signature=signature, options={"file": rel, **options})


def _run(booster: Any, x: np.ndarray[Any, Any], options: Mapping[str, Any]) -> Batch:
    predict_type = str(options.get("predict_type", "value"))
    names: Sequence[str] = options.get("outputs") or ()
    if not names:
        return {"output-0": _predict(booster, x, predict_type)}
    out = class_outputs(names, lambda: _predict(booster, x, "value"), lambda: _predict(booster, x, "margin"),
                        str(options.get("objective")) in _PROBABILITY)
    shown = options.get("output_names") or names
    return {str(s): out[n] for s, n in zip(shown, names, strict=True)}


class XGBoostModel(Model):
    computes_only = True

    def load(self) -> None:
        assert self.pod is not None
        opts: Mapping[str, Any] = self.pod.manifest.options
        self.booster = _booster(self.pod.file(str(opts["file"])), int_option(opts, "threads"))
        self.options = dict(opts)
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        (x,) = inputs.values()
        return _run(self.booster, x, self.options)

    def unload(self) -> None:
        self.__dict__.pop("booster", None)
        super().unload()


def load(pod: Pod) -> Model:
    return XGBoostModel(pod)
