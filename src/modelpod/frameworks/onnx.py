"""ONNX: ``.onnx`` files (with any external-data files beside them), run by onnxruntime.

A detector or classifier (an Ultralytics export's metadata ``task``, or ``--task detect|classify``)
becomes an images-in pod: encoded images in, boxes or top-k classes out (``modelpod.vision``).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError, MissingExtraError
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
from modelpod.model import Batch, Model, row_parameters
from modelpod.pod import Pod, Signature, TensorSpec

NAME = "onnx"
EXTRA = "onnx"
IMPORTS = ("onnx", "onnxruntime")
RUNTIME_IMPORTS = ("onnxruntime",)  # serving needs no onnx (packing reads external data with it): a faster start
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


def _session(path: Path, options: Mapping[str, Any], replica: bool = False) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = int_option(options, "threads")
    if threads is None and replica:
        # A process replica runs one intra-op thread: the replicas are the parallelism, and a session
        # that starts no thread pool can be loaded once in the template and shared by every replica
        # (its weights, pre-packed ones included, stay shared pages). threads=0: ORT's own pool.
        threads = 1
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
    vision = _vision_config(session, outputs, request.options, file)
    if vision is not None:
        from modelpod.vision.task import signature as vision_signature

        return Packed(signature=vision_signature(vision), options={"file": rel, "vision": vision},
                      distributions=("pillow",))
    signature = Signature(
        tuple(_spec(i, file) for i in session.get_inputs()),
        tuple(_spec(o, file) for o in outputs),
    )
    return Packed(signature=signature, options={"file": rel})


def _vision_config(session: Any, outputs: Sequence[Any], options: Mapping[str, Any], file: Path
                   ) -> dict[str, Any] | None:
    """The detector/classifier config (Ultralytics metadata, or --task), or None for a plain model."""
    from modelpod.vision import TASKS

    metadata = dict(session.get_modelmeta().custom_metadata_map or {})
    if not (options.get("task") or metadata.get("task") in TASKS):
        return None
    if importlib.util.find_spec("PIL") is None:
        raise MissingExtraError("vision", "PIL", "detector and classifier pods")
    from modelpod.vision.task import config

    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise FrameworkError(f"{file.name}: a {options.get('task') or metadata.get('task')} model takes one "
                             f"image tensor, this one takes {len(inputs)} inputs")
    shape = _dims(inputs[0].shape)
    return config(metadata, options, shape, _dims(outputs[0].shape), file.name)


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or ()))


class OnnxModel(Model):
    computes_only = True

    def load(self) -> None:
        assert self.pod is not None
        opts = self.pod.manifest.options
        self.session = _session(self.pod.file(str(opts["file"])), opts, self.replica)
        self.outputs = [o.name for o in _tensor_outputs(self.session)]
        self.strings = {i.name for i in self.session.get_inputs() if i.type == "tensor(string)"}
        self.pipeline = _pipeline(self.session, opts) if opts.get("vision") else None
        # Images of different requests share a run: each image carries its request's parameters.
        self.takes_parameters = self.row_parameters = self.pipeline is not None
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        if self.pipeline is not None:
            from modelpod.vision.task import INPUT

            images = inputs[INPUT]
            out: Batch = self.pipeline(images, row_parameters(inputs, int(images.size)))
            return out
        feeds = {k: (_strings(v) if k in self.strings else v) for k, v in inputs.items()}
        results: Sequence[Any] = self.session.run(self.outputs, feeds)
        return {name: _bytes(np.asarray(r)) for name, r in zip(self.outputs, results, strict=True)}

    def split_outputs(self, outputs: Batch, parts: Sequence[Batch]) -> list[Batch] | None:
        if self.pipeline is None:
            return None
        from modelpod.vision.task import split_outputs

        cut: list[Batch] = split_outputs(self.pipeline.task, self.pipeline.top_k, outputs, parts)
        return cut

    def records(self, outputs: Batch, rows: int) -> tuple[Batch, np.ndarray[Any, Any]] | None:
        found: tuple[Batch, np.ndarray[Any, Any]] | None = (
            self.pipeline.records(outputs, rows) if self.pipeline is not None else None)
        return found

    def unload(self) -> None:
        self.__dict__.pop("session", None)
        super().unload()


def _pipeline(session: Any, opts: Mapping[str, Any]) -> Any:
    """The vision pipeline around the session: one image tensor in, the first output out."""
    from modelpod.vision.task import Pipeline

    image = session.get_inputs()[0]
    first = session.get_outputs()[0].name
    dtype = np.float16 if image.type == "tensor(float16)" else np.float32
    shape = _dims(image.shape)

    def run(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.asarray(session.run([first], {image.name: batch.astype(dtype, copy=False)})[0])

    return Pipeline(opts["vision"], run, free_hw=len(shape) == 4 and (shape[2] < 0 or shape[3] < 0),
                    free_batch=bool(shape) and shape[0] < 0,
                    max_pixels=int_option(opts, "max_pixels"), max_images=int_option(opts, "max_images"),
                    top_k=int_option(opts, "top_k"))


def _strings(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # onnxruntime wants str objects where OIP carries bytes.
    return np.asarray(as_text(array), dtype=object).reshape(array.shape)


def _bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if array.dtype.kind in "OU":
        return bytes_array(array.reshape(-1).tolist()).reshape(array.shape)
    return array


def load(pod: Pod) -> Model:
    return OnnxModel(pod)
