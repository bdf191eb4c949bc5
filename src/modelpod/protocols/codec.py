"""OIP v2 tensors <-> numpy: JSON (flat or nested ``data``) and the binary tensor data extension.

Binary extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by
the raw tensors, in input order, each sized by its ``parameters.binary_data_size``. BYTES tensors
in binary form are a 4-byte little-endian length before each element.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError
from modelpod.pod import DATATYPES, datatype_of

Batch = dict[str, np.ndarray[Any, Any]]
_INTEGERS = frozenset(k for k in DATATYPES if "INT" in k)


@dataclass(frozen=True)
class InferRequest:
    inputs: Batch
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # Requested outputs: name -> wants binary; None means every output, JSON unless binary asked.
    outputs: Mapping[str, bool] | None = None
    binary_output: bool = False


def decode_request(obj: Any, binary: memoryview | bytes | None = None) -> InferRequest:
    """Decode an OIP v2 request body (already parsed JSON) plus the binary tail, if any."""
    if not isinstance(obj, dict):
        raise InvalidRequestError("request body must be a JSON object")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("request must have a non-empty 'inputs' list")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("'parameters' must be an object")
    view = memoryview(binary) if binary is not None else memoryview(b"")
    offset = 0
    inputs: Batch = {}
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise InvalidRequestError(f"inputs[{i}] must be an object")
        name, datatype, shape = _head(t, f"inputs[{i}]")
        if name in inputs:
            raise InvalidRequestError(f"input {name!r} given twice")
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise InvalidRequestError(f"input {name!r}: 'parameters' must be an object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(view):
                raise InvalidRequestError(f"input {name!r}: binary_data_size {size!r} runs past the body")
            inputs[name] = tensor_from_bytes(name, datatype, shape, view[offset : offset + size])
            offset += size
        else:
            if "data" not in t:
                raise InvalidRequestError(f"input {name!r} has neither 'data' nor binary_data_size")
            inputs[name] = tensor_from_json(name, datatype, shape, t["data"])
    if offset != len(view):
        raise InvalidRequestError(f"{len(view) - offset} bytes of binary data were not claimed by any input")
    outputs: dict[str, bool] | None = None
    binary_output = bool(params.get("binary_data_output", False))
    raw_outputs = obj.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidRequestError("'outputs' must be a list")
        outputs = {}
        for j, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidRequestError(f"outputs[{j}] must be an object with a 'name'")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise InvalidRequestError(f"output {o['name']!r}: 'parameters' must be an object")
            outputs[o["name"]] = bool(op.get("binary_data", binary_output))
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidRequestError("'id' must be a string")
    return InferRequest(inputs, rid, params, outputs, binary_output)


def _head(t: Mapping[str, Any], where: str) -> tuple[str, str, tuple[int, ...]]:
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}: 'name' must be a non-empty string")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list):
        raise InvalidRequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    for d in shape:
        if type(d) is not int or d < 0:  # JSON gives int or bool; bool is refused too
            raise InvalidRequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return name, datatype, tuple(shape)


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray[Any, Any]:
    n = _count(shape)
    if datatype == "BYTES":
        flat = _flatten(data, name)
        if len(flat) != n:
            raise InvalidRequestError(f"input {name!r}: {len(flat)} elements for shape {list(shape)}")
        out = np.empty(n, dtype=object)
        for i, v in enumerate(flat):
            if isinstance(v, str):
                out[i] = v.encode()
            elif isinstance(v, (bytes, bytearray)):
                out[i] = bytes(v)
            else:
                raise InvalidRequestError(f"input {name!r}: BYTES elements must be strings")
        return out.reshape(shape)
    try:
        # numpy turns 1.5 (or true) into the integer 1 without a word: integer tensors take integers only.
        if datatype in _INTEGERS and np.asarray(data).dtype.kind not in "iu":
            raise InvalidRequestError(f"input {name!r}: {datatype} data must be integers")
        # Values out of range (1e300 as FP32) are refused rather than turned into inf.
        with np.errstate(over="raise", invalid="raise"):
            arr = np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError, FloatingPointError):
        raise InvalidRequestError(f"input {name!r}: data does not fit datatype {datatype}") from None
    if arr.size != n:
        raise InvalidRequestError(f"input {name!r}: {arr.size} elements for shape {list(shape)}")
    if datatype == "BOOL" and not _all_bools(data):
        raise InvalidRequestError(f"input {name!r}: BOOL data must be true/false")
    return arr.reshape(shape)


def _all_bools(data: Any) -> bool:
    if isinstance(data, list):
        return all(_all_bools(d) for d in data)
    return isinstance(data, bool)


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def tensor_from_bytes(name: str, datatype: str, shape: tuple[int, ...], buf: memoryview) -> np.ndarray[Any, Any]:
    n = _count(shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(buf):
            if pos + 4 > len(buf):
                raise InvalidRequestError(f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if pos + length > len(buf):
                raise InvalidRequestError(f"input {name!r}: truncated BYTES element")
            items.append(bytes(buf[pos : pos + length]))
            pos += length
        if len(items) != n:
            raise InvalidRequestError(f"input {name!r}: {len(items)} elements for shape {list(shape)}")
        out = np.empty(n, dtype=object)
        out[:] = items
        return out.reshape(shape)
    dtype = DATATYPES[datatype]
    if len(buf) != n * dtype.itemsize:
        raise InvalidRequestError(
            f"input {name!r}: {len(buf)} bytes for shape {list(shape)} of {datatype} (want {n * dtype.itemsize})"
        )
    return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(shape)


def tensor_to_json(name: str, arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    datatype = datatype_of(arr)
    if datatype == "BYTES":
        data: Any = [_text(v) for v in arr.reshape(-1).tolist()]
    else:
        data = arr.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}


def tensor_to_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    if datatype_of(arr) == "BYTES":
        parts = []
        for v in arr.reshape(-1).tolist():
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def encode_response(
    model_name: str,
    model_version: str | None,
    outputs: Mapping[str, np.ndarray[Any, Any]],
    request: InferRequest | None = None,
) -> tuple[dict[str, Any], list[bytes]]:
    """The response JSON and the binary tails (in output order) for the binary extension."""
    wanted = request.outputs if request is not None else None
    default_binary = request.binary_output if request is not None else False
    if wanted:
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise InvalidRequestError(f"unknown output(s) {', '.join(missing)}; outputs: {', '.join(outputs)}")
    body_outputs: list[dict[str, Any]] = []
    tails: list[bytes] = []
    for name, arr in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        arr = np.asarray(arr)
        if (wanted or {}).get(name, default_binary):
            raw = tensor_to_bytes(arr)
            body_outputs.append({"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape),
                                 "parameters": {"binary_data_size": len(raw)}})
            tails.append(raw)
        else:
            body_outputs.append(tensor_to_json(name, arr))
    body: dict[str, Any] = {"model_name": model_name, "outputs": body_outputs}
    if model_version is not None:
        body["model_version"] = model_version
    if request is not None and request.id is not None:
        body["id"] = request.id
    return body, tails
