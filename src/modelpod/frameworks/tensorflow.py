"""TensorFlow: SavedModel directories and Keras 3 ``.keras`` files.

A ``.keras`` file is a zip holding ``config.json``; a ``Lambda`` layer in it carries Python
bytecode, so such files are refused unless the user opts in with ``--allow-pickle`` (recorded in
the manifest), and Keras loads every other file with ``safe_mode=True``.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError, UnsafeModelError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import (
    MODEL_DIR,
    copy_model_file,
    copy_tree,
    name_outputs,
    one_line,
    unreadable,
    wrong_format,
    zip_names,
)
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec
from modelpod.safety import keras_code_objects

NAME = "tensorflow"
EXTRA = "tensorflow"
IMPORTS = ("tensorflow",)
DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "keras")
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
EXPECTED = "a TensorFlow SavedModel directory (saved_model.pb) or a Keras .keras file"
DEFAULT_SIGNATURE = "serving_default"
LAMBDA_OPT_IN = "a Keras model with Lambda layers (Python bytecode)"

TF_TYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "int8": "INT8", "int16": "INT16",
    "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "bool": "BOOL", "string": "BYTES",
}


def _is_saved_model(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file())


def _is_keras(path: Path) -> bool:
    return path.is_file() and path.suffix == ".keras" and "config.json" in (zip_names(path) or ())


def detect(path: Path) -> bool:
    return _is_saved_model(path) or _is_keras(path)


def _datatype(dtype: Any, where: str) -> str:
    name = getattr(dtype, "name", str(dtype))
    try:
        return TF_TYPES[name]
    except KeyError:
        raise FrameworkError(f"{where} has dtype {name}, which OIP cannot carry") from None


def _shape(shape: Any) -> tuple[int, ...] | None:
    """A TensorShape or KerasTensor shape with free dims as -1; None for an unknown rank."""
    if shape is None or getattr(shape, "rank", 0) is None:
        return None
    dims = shape.as_list() if hasattr(shape, "as_list") else list(shape)
    return tuple(-1 if d is None else int(d) for d in dims)


def _spec(name: str, tensor: Any, where: str) -> TensorSpec | None:
    shape = _shape(tensor.shape)
    return None if shape is None else TensorSpec(name, _datatype(tensor.dtype, where), shape)


# -- SavedModel ------------------------------------------------------------------------------
def _saved_model_fn(path: Path, key: str) -> tuple[Any, Any]:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise unreadable(path, "a TensorFlow SavedModel", exc) from None
    if key not in loaded.signatures:
        have = ", ".join(loaded.signatures) or "none"
        raise FrameworkError(f"{path.name}: the SavedModel has no signature {key!r} (it has: {have})")
    # Keep the loaded object alive with the function: its variables live there.
    return loaded, loaded.signatures[key]


def _saved_model_signature(fn: Any, path: Path) -> Signature | None:
    _, kwargs = fn.structured_input_signature
    inputs = [_spec(n, t, f"{path.name}: input {n!r}") for n, t in sorted(kwargs.items())]
    outputs = [_spec(n, t, f"{path.name}: output {n!r}") for n, t in sorted(fn.structured_outputs.items())]
    if any(s is None for s in inputs):
        return None  # an input of unknown rank: the signature has to come from --sample
    return Signature(tuple(s for s in inputs if s), tuple(s for s in outputs if s))


# -- Keras -------------------------------------------------------------------------------------
def _keras_config(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise unreadable(path, "a Keras .keras file", exc) from None


def _check_keras(path: Path, allow_pickle: bool) -> None:
    found = keras_code_objects(_keras_config(path))
    if found and not allow_pickle:
        raise UnsafeModelError(
            f"{path.name}: {LAMBDA_OPT_IN} ({', '.join(found)}) runs code when it is loaded, so modelpod "
            "refuses it by default; pass --allow-pickle to accept it, or replace the Lambda with a "
            "registered layer class"
        )


def _load_keras(path: Path, allow_pickle: bool) -> Any:
    _check_keras(path, allow_pickle)
    import keras

    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=not allow_pickle)
    except ValueError as exc:
        if "safe_mode" in str(exc):
            raise UnsafeModelError(f"{path.name}: Keras refused it in safe mode: {one_line(exc)}") from None
        raise unreadable(path, "a Keras .keras file", exc) from None
    except (OSError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise unreadable(path, "a Keras .keras file", exc) from None


def _keras_signature(model: Any, path: Path) -> Signature | None:
    try:
        tensors, outs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError):  # a Sequential never built on an Input has no shapes
        return None
    inputs = [_spec(t.name, t, f"{path.name}: input {t.name!r}") for t in tensors]
    names = _keras_output_names(model, len(outs))
    outputs = [_spec(n, t, f"{path.name}: output {n!r}") for n, t in zip(names, outs, strict=True)]
    if not inputs or any(s is None for s in inputs):
        return None
    return Signature(tuple(s for s in inputs if s), tuple(s for s in outputs if s))


def _keras_output_names(model: Any, count: int) -> list[str]:
    """The output layers' names (``prob``); a lone output keeps ``output-0`` unless its name was given."""
    names = [str(n) for n in getattr(model, "output_names", None) or ()]
    if len(set(names)) != count:
        return [f"output-{i}" for i in range(count)]
    if count == 1 and not _given_name(model, names[0]):
        return ["output-0"]
    return names


def _given_name(model: Any, name: str) -> bool:
    """Whether a layer's name was chosen by the user (Keras makes ``dense``, ``dense_3``, ... itself)."""
    try:
        layer = model.get_layer(name)
    except (ValueError, AttributeError):
        return False
    auto = re.sub(r"(?<!^)(?=[A-Z])", "_", type(layer).__name__).lower()
    return re.fullmatch(rf"{re.escape(auto)}(_\d+)?", name) is None


# -- the adapter -------------------------------------------------------------------------------
def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    if _is_keras(src):
        model = _load_keras(src, request.allow_pickle)
        rel = copy_model_file(src, dest)
        return Packed(signature=_keras_signature(model, src), options={"format": "keras", "file": rel})
    if _is_saved_model(src):
        key = str(request.options.get("signature") or DEFAULT_SIGNATURE)
        _, fn = _saved_model_fn(src, key)
        copy_tree(src, dest)
        roles = {f"{MODEL_DIR}/assets": "data", f"{MODEL_DIR}/assets.extra": "data"}
        return Packed(signature=_saved_model_signature(fn, src), roles=roles,
                      options={"format": "saved_model", "file": MODEL_DIR, "signature": key})
    raise wrong_format(src, NAME, EXPECTED)


class TensorFlowModel(Model):
    def load(self) -> None:
        assert self.pod is not None
        opts: Mapping[str, Any] = self.pod.manifest.options
        path = self.pod.file(str(opts["file"]))
        self.format = str(opts.get("format"))
        if self.format == "keras":
            self.keras = _load_keras(path, self.pod.manifest.allow_pickle)
        else:
            self.saved, self.fn = _saved_model_fn(path, str(opts.get("signature") or DEFAULT_SIGNATURE))
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        names = [t.name for t in self.signature.outputs]
        if self.format == "keras":
            order = [t.name for t in self.signature.inputs] or list(inputs)
            args = [inputs[n] for n in order]
            result = self.keras.predict_on_batch(args[0] if len(args) == 1 else args)
            return name_outputs(result, np.asarray, names)
        import tensorflow as tf

        out = self.fn(**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: np.asarray(v.numpy()) for k, v in out.items()}

    def unload(self) -> None:
        for attr in ("keras", "saved", "fn"):
            self.__dict__.pop(attr, None)
        super().unload()


def load(pod: Pod) -> Model:
    return TensorFlowModel(pod)
