"""ModelInfer messages <-> the engine's records: what protocols/grpc.py translates on every call.

A request is read in two passes, as over REST: every input's header (name, datatype, shape) goes
through ``InputCheck.header`` before any tensor data is touched, then the data is decoded and
``InputCheck.finish`` applied. ``raw_input_contents`` become arrays over the received bytes
(``numpy.frombuffer``, no copy beyond the one protobuf makes handing the field to Python); typed
``contents`` are converted in steps of ``STEP`` values. The answer is raw whenever the request was
raw or an output is FP16/BF16 (which only travel raw), typed otherwise.

The hot path indexes protobuf's repeated fields rather than iterating them: their iterator ends
by raising (and formatting) an IndexError, a few thousand instructions per loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError
from modelpod.inputs import MAX_DIMS, STEP, InputCheck
from modelpod.pod import DATATYPES, Signature, datatype_of
from modelpod.protocols._generated import open_inference_pb2 as pb
from modelpod.protocols.codec import tensor_from_bytes, tensor_to_bytes
from modelpod.serving.messages import InferRequest, InferResult

_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# The numpy type each typed-contents field arrives as (protobuf's own scalar types).
_WIRE = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
         "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
         "fp64_contents": np.float64}
# Raw tensors are little-endian on the wire; one dtype object per datatype, made once.
_LITTLE = {name: dt.newbyteorder("<") for name, dt in DATATYPES.items() if name != "BYTES"}
_UNCHECKED = InputCheck(Signature())
# A request whose message is larger than this, or whose typed contents hold more than STEP values,
# is decoded on a thread (in steps), so the event loop keeps answering meanwhile.
BIG_BYTES = 256 * 1024

Head = tuple[str, str, tuple[int, ...], int]


def parameter(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def read_heads(msg: Any, check: InputCheck | None = None) -> tuple[list[Head], bool]:
    """Every input's (name, datatype, shape, element count), checked against the model before any
    data is read; and whether decoding the data is big enough for a thread."""
    tensors = msg.inputs
    count = len(tensors)
    raw = len(msg.raw_input_contents)
    if raw and raw != count:
        raise InvalidRequestError(f"{raw} raw_input_contents for {count} inputs")
    if not count:
        raise InvalidRequestError("the request has no inputs")
    check = check or _UNCHECKED
    if check.typed and count > len(check.signature.inputs):
        check.names((), count)  # raises: more inputs than the model takes
    heads: list[Head] = []
    seen: set[str] = set()
    values = 0
    for i in range(count):
        t = tensors[i]
        name, datatype = t.name, t.datatype
        if not name:
            raise InvalidRequestError(f"inputs[{i}] has no name")
        if name in seen:
            raise InvalidRequestError(f"input {name!r} given twice")
        seen.add(name)
        if datatype not in DATATYPES:
            raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r}")
        shape = tuple(t.shape)
        if len(shape) > MAX_DIMS:
            raise InvalidRequestError(f"input {name!r}: {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
        if shape and min(shape) < 0:
            raise InvalidRequestError(f"input {name!r}: negative dimension in shape {list(shape)}")
        n = check.header(name, datatype, shape)
        values += n
        heads.append((name, datatype, shape, n))
    check.names(seen, len(seen))
    big = (not raw and values > STEP) or msg.ByteSize() > BIG_BYTES
    return heads, big


def read_tensors(msg: Any, heads: list[Head], check: InputCheck | None = None) -> InferRequest:
    """The request, its data decoded (``heads`` from ``read_heads`` of the same message)."""
    check = check or _UNCHECKED
    raw = msg.raw_input_contents
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, (name, datatype, shape, n) in enumerate(heads):
        if not raw:
            arr = _from_contents(name, datatype, shape, n, msg.inputs[i].contents)
        elif datatype == "BYTES":
            arr = tensor_from_bytes(name, datatype, shape, memoryview(raw[i]))
        else:
            data = raw[i]
            dtype = _LITTLE[datatype]
            if len(data) != n * dtype.itemsize:
                raise InvalidRequestError(f"input {name!r}: {len(data)} bytes for shape {list(shape)} of {datatype} "
                                          f"(want {n * dtype.itemsize})")
            arr = np.frombuffer(data, dtype=dtype).reshape(shape)
        inputs[name] = check.finish(name, arr)
    wanted = msg.outputs
    outputs = {wanted[j].name: True for j in range(len(wanted))} if len(wanted) else None
    given = msg.parameters
    params = {k: parameter(v) for k, v in given.items()} if len(given) else {}
    return InferRequest(inputs, msg.id or None, params, outputs, binary_output=bool(raw),
                        checked=check.signature if check.typed else None)


def decode_infer(msg: Any, check: InputCheck | None = None) -> InferRequest:
    """A ModelInferRequest as the engine's InferRequest; with ``check``, headers are checked first."""
    heads, _ = read_heads(msg, check)
    return read_tensors(msg, heads, check)


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], n: int, contents: Any) -> np.ndarray[Any, Any]:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidRequestError(f"input {name!r}: {datatype} travels only as raw_input_contents")
    values = getattr(contents, field)
    if len(values) != n:
        raise InvalidRequestError(f"input {name!r}: {len(values)} values for shape {list(shape)}")
    if datatype == "BYTES":
        arr = np.empty(n, dtype=object)
        for i in range(0, n, STEP):
            arr[i:i + STEP] = list(values[i:i + STEP])
        return arr.reshape(shape)
    # int_contents carries INT8/INT16 as int32: values must fit the declared type, never wrap.
    wide: np.ndarray[Any, Any] = np.empty(n, dtype=_WIRE[field])
    for i in range(0, n, STEP):  # in steps: each numpy call holds the GIL
        wide[i:i + STEP] = values[i:i + STEP]
    want = DATATYPES[datatype]
    if want != wide.dtype and wide.size:
        info = np.iinfo(want)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequestError(f"input {name!r}: values do not fit {datatype}")
    return wide.astype(want).reshape(shape)


def encode_infer(result: InferResult, request: InferRequest) -> Any:
    """The engine's answer as a ModelInferResponse, raw or typed like the request."""
    wanted = request.outputs
    outputs = result.outputs
    if wanted:
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise InvalidRequestError(f"unknown output(s) {', '.join(missing)}")
    kinds = []
    raw = request.binary_output
    for name, arr in outputs.items():
        if wanted is None or name in wanted:
            arr = np.asarray(arr)
            datatype = datatype_of(arr)
            raw = raw or datatype not in _CONTENTS
            kinds.append((name, arr, datatype))
    msg = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version or "",
                                id=result.id or request.id or "")
    tensors, blobs = msg.outputs, msg.raw_output_contents
    for name, arr, datatype in kinds:
        out = tensors.add(name=name, datatype=datatype, shape=arr.shape)
        if raw:
            blobs.append(_raw(arr, datatype))
        elif datatype == "BYTES":
            out.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1).tolist())
        else:
            getattr(out.contents, _CONTENTS[datatype]).extend(arr.reshape(-1).tolist())
    return msg


def _raw(arr: np.ndarray[Any, Any], datatype: str) -> bytes:
    if datatype == "BYTES" or arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and _BIG_ENDIAN):
        return tensor_to_bytes(arr)
    return arr.tobytes()  # C order, whatever the array's strides


_BIG_ENDIAN = np.dtype("=i4").newbyteorder("<") != np.dtype("=i4")
