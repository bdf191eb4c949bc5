"""ONNX: ``.onnx`` files (with any external-data files beside them), run by onnxruntime."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import (
    MODEL_DIR,
    as_text,
    bytes_array,
    copy_model_file,
    int_option,
    pick_file,
    unreadable,
)
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec

NAME = "onnx"
EXTRA = "onnx"
IMPORTS = ("onnx", "onnxruntime")
DISTRIBUTIONS = ("onnx", "onnxruntime")
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
EXPECTED = "an ONNX model (.onnx)"
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

# onnxruntime's type strings -> OIP datatypes. bfloat16 and complex types have no OIP equivalent.
ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".onnx"


def _spec(node: Any, path: Path) -> TensorSpec:
    try:
        datatype = ORT_TYPES[node.type]
    except KeyError:
        raise FrameworkError(
            f"{path.name}: tensor {node.name!r} has type {node.type}, which OIP cannot carry"
        ) from None
    # Symbolic ("batch") and unknown (None) dimensions are free.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, datatype, shape)


def _external_files(file: Path) -> list[str]:
    """Relative paths of the external-data files an ONNX model refers to (weights kept apart)."""
    import onnx

    try:
        proto = onnx.load(str(file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise unreadable(file, EXPECTED, exc) from None
    found: set[str] = set()
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            rel = PurePosixPath(location)
            if rel.is_absolute() or ".." in rel.parts or not location:
                raise FrameworkError(
                    f"{file.name}: external data location {location!r} is outside the model's directory"
                )
            found.add(location)
    return sorted(found)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto in a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _session(path: Path, options: Mapping[str, Any]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = int_option(options, "threads")
    if threads:
        so.intra_op_num_threads = threads
    providers = options.get("providers") or DEFAULT_PROVIDERS
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise unreadable(path, EXPECTED, exc) from None


def _tensor_outputs(session: Any) -> list[Any]:
    # skl2onnx's ZipMap output (a sequence of maps) is not a tensor: it is left out.
    return [o for o in session.get_outputs() if o.type.startswith("tensor(")]


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    file = pick_file(src, detect, NAME, EXPECTED)
    rel = copy_model_file(file, dest)
    for extra in _external_files(file):
        source = file.parent / extra
        if not source.is_file():
            raise FrameworkError(f"{file.name}: external data file {extra} is missing")
        target = dest / MODEL_DIR / extra
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    # Opening the session in the staging copy checks the operators and that no data file is missing.
    session = _session(dest / rel, request.options)
    outputs = _tensor_outputs(session)
    if not outputs:
        raise FrameworkError(f"{file.name}: the model has no tensor outputs")
    signature = Signature(
        tuple(_spec(i, file) for i in session.get_inputs()),
        tuple(_spec(o, file) for o in outputs),
    )
    return Packed(signature=signature, options={"file": rel})


class OnnxModel(Model):
    def load(self) -> None:
        assert self.pod is not None
        opts = self.pod.manifest.options
        self.session = _session(self.pod.file(str(opts["file"])), opts)
        self.outputs = [o.name for o in _tensor_outputs(self.session)]
        self.strings = {i.name for i in self.session.get_inputs() if i.type == "tensor(string)"}
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        feeds = {k: (_strings(v) if k in self.strings else v) for k, v in inputs.items()}
        results: Sequence[Any] = self.session.run(self.outputs, feeds)
        return {name: _bytes(np.asarray(r)) for name, r in zip(self.outputs, results, strict=True)}

    def unload(self) -> None:
        self.__dict__.pop("session", None)
        super().unload()


def _strings(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # onnxruntime wants str objects where OIP carries bytes.
    return np.asarray(as_text(array), dtype=object).reshape(array.shape)


def _bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if array.dtype.kind in "OU":
        return bytes_array(array.reshape(-1).tolist()).reshape(array.shape)
    return array


def load(pod: Pod) -> Model:
    return OnnxModel(pod)
