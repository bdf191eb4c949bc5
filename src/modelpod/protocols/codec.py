"""OIP v2 tensors <-> numpy: JSON (flat or nested ``data``) and the binary tensor data extension.

Binary extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by
the raw tensors, in input order, each sized by its ``parameters.binary_data_size``. BYTES tensors
in binary form are a 4-byte little-endian length before each element.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError
from modelpod.inputs import MAX_DIMS, STEP, InputCheck, bytes_from_values, check_shape, flat_numbers, from_values
from modelpod.pod import DATATYPES, Signature, datatype_of
from modelpod.serving.messages import InferRequest

Batch = dict[str, np.ndarray[Any, Any]]
_UNCHECKED = InputCheck(Signature())


def decode_request(obj: Any, binary: memoryview | bytes | None = None, check: InputCheck | None = None,
                   ) -> InferRequest:
    """Decode an OIP v2 request body (already parsed JSON) plus the binary tail, if any.

    With ``check`` (the target model's signature), every input's header is checked before any
    tensor data is decoded, and the decoded tensors are widened to the signature's datatypes.
    """
    if not isinstance(obj, dict):
        raise InvalidRequestError("request body must be a JSON object")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("request must have a non-empty 'inputs' list")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("'parameters' must be an object")
    view = memoryview(binary) if binary is not None else memoryview(b"")
    check = check or _UNCHECKED
    heads = _heads(raw_inputs, check, len(view))
    offset = 0
    inputs: Batch = {}
    for t, name, datatype, shape, size, n in heads:
        if size is not None:
            arr = tensor_from_bytes(name, datatype, shape, view[offset : offset + size])
            offset += size
        else:
            arr = tensor_from_json(name, datatype, shape, check.json_data(name, datatype, t["data"]), n)
        inputs[name] = check.finish(name, arr)
    if offset != len(view):
        raise InvalidRequestError(f"{len(view) - offset} bytes of binary data were not claimed by any input")
    outputs: dict[str, bool] | None = None
    binary_output = flag(params, "binary_data_output", False, "parameters")
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
            outputs[o["name"]] = flag(op, "binary_data", binary_output, f"output {o['name']!r}")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidRequestError("'id' must be a string")
    return InferRequest(inputs, rid, params, outputs, binary_output, check.signature if check.typed else None)


def decode_plain(obj: Any, check: InputCheck, tail: memoryview | None = None) -> InferRequest | None:
    """The plain request in one pass, or None: then ``decode_request`` decides, and names any fault.

    Plain: ``{"inputs": [...]}`` (and perhaps a string ``id`` and an ``outputs`` list of names, each
    perhaps with a boolean ``binary_data``), each of the signature's inputs once as exactly
    ``name``, ``datatype`` (the signature's own), ``shape`` (its rank and fixed sizes, no zero) and
    either a flat ``data`` list of that many numbers that fit the datatype or, with a binary
    ``tail``, ``parameters: {"binary_data_size": N}`` claiming the next N bytes of it (all of it
    claimed, in order); no NaN/Infinity where the model refuses them. What comes back is what
    ``decode_request`` makes of the same body (tests/protocols/test_plain_decode.py compares the
    two on random bodies); it skips the general path's per-field bookkeeping, which costs more
    than the tensors of a small request.
    """
    plan = check.plain
    if plan is None or type(obj) is not dict:
        return None
    rid = outputs = None
    if len(obj) != 1:
        rid = obj.get("id")
        if rid is not None and type(rid) is not str:
            return None
        raw_outputs = obj.get("outputs")
        if raw_outputs is not None:
            outputs = _plain_outputs(raw_outputs)
            if outputs is None:
                return None
        if len(obj) != 1 + (rid is not None) + (raw_outputs is not None):
            return None
    raw = obj.get("inputs")
    if type(raw) is not list or len(raw) != len(plan):
        return None
    inputs: Batch = {}
    offset = 0
    for t in raw:
        if type(t) is not dict or len(t) != 4:
            return None
        name = t.get("name")
        if type(name) is not str:
            return None
        p = plan.get(name)
        if p is None or name in inputs or t.get("datatype") != p[0]:
            return None
        shape = t.get("shape")
        if type(shape) is not list or len(shape) != p[1]:
            return None
        n = 1
        for d in shape:
            if type(d) is not int or d < 1:
                return None
            n *= d
        for i, d in p[2]:
            if shape[i] != d:
                return None
        if tail is None:
            data = t.get("data")
            if type(data) is not list or n != len(data) or n > STEP:  # no dimension is then out of bounds
                return None
            arr = flat_numbers(p[0], data)
            if arr is None:
                return None
        else:
            params = t.get("parameters")
            if type(params) is not dict or len(params) != 1:
                return None
            size = params.get("binary_data_size")
            dtype = DATATYPES[p[0]].newbyteorder("<")
            if type(size) is not int or size != n * dtype.itemsize or offset + size > len(tail):
                return None
            arr = np.frombuffer(tail, dtype=dtype, count=n, offset=offset)
            offset += size
        if check.nonfinite == "reject" and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return None
        inputs[name] = arr.reshape(shape)
    if tail is not None and offset != len(tail):
        return None
    return InferRequest(inputs, rid, {}, outputs, False, check.signature)


def _plain_outputs(raw: Any) -> dict[str, bool] | None:
    """``outputs`` as names (each perhaps with a boolean ``binary_data``), or None for anything else."""
    if type(raw) is not list:
        return None
    outputs: dict[str, bool] = {}
    for o in raw:
        if type(o) is not dict:
            return None
        name = o.get("name")
        if type(name) is not str:
            return None
        if len(o) == 1:
            outputs[name] = False
            continue
        params = o.get("parameters")
        if len(o) != 2 or type(params) is not dict or len(params) != 1:
            return None
        wanted = params.get("binary_data")
        if type(wanted) is not bool:
            return None
        outputs[name] = wanted
    return outputs


_Head = tuple[Mapping[str, Any], str, str, tuple[int, ...], "int | None", int]


def _heads(raw_inputs: list[Any], check: InputCheck, tail_bytes: int) -> list[_Head]:
    """Every input's header, checked against the signature before any data is decoded."""
    if check.typed and len(raw_inputs) > len(check.signature.inputs):  # before reading any of them
        check.names((), len(raw_inputs))  # raises: more inputs than the model takes
    heads: list[_Head] = []
    seen: set[str] = set()
    claimed = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise InvalidRequestError(f"inputs[{i}] must be an object")
        name, datatype, shape = _head(t, f"inputs[{i}]")
        if name in seen:
            raise InvalidRequestError(f"input {name!r} given twice")
        seen.add(name)
        n = check.header(name, datatype, shape)
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise InvalidRequestError(f"input {name!r}: 'parameters' must be an object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or claimed + size > tail_bytes:
                raise InvalidRequestError(f"input {name!r}: binary_data_size {size!r} runs past the body")
            itemsize = DATATYPES[datatype].itemsize
            if datatype != "BYTES" and size != n * itemsize:
                raise InvalidRequestError(f"input {name!r}: {size} bytes for shape {list(shape)} of {datatype} "
                                          f"(want {n * itemsize})")
            if datatype == "BYTES" and size < 4 * n:
                raise InvalidRequestError(f"input {name!r}: {size} bytes cannot hold {n} BYTES elements")
            claimed += size
        elif "data" not in t:
            raise InvalidRequestError(f"input {name!r} has neither 'data' nor binary_data_size")
        else:
            data = t["data"]
            if isinstance(data, list) and data and not isinstance(data[0], list) and len(data) != n:
                raise InvalidRequestError(f"input {name!r}: {len(data)} elements for shape {list(shape)}")
        heads.append((t, name, datatype, shape, size, n))
    check.names(seen, len(seen))
    return heads


def flag(params: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter: JSON true/false only ("false" is not false, so it is refused)."""
    value = params.get(key, default)
    if type(value) is not bool:
        raise InvalidRequestError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _head(t: Mapping[str, Any], where: str) -> tuple[str, str, tuple[int, ...]]:
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}: 'name' must be a non-empty string")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list):
        raise InvalidRequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InvalidRequestError(f"input {name!r}: {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    for d in shape:
        if type(d) is not int or d < 0:  # JSON gives int or bool; bool is refused too
            raise InvalidRequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return name, datatype, tuple(shape)


def tensor_from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any, n: int | None = None,
                     ) -> np.ndarray[Any, Any]:
    """One JSON tensor; ``n``: its element count when the header was checked already."""
    if n is None:
        n = check_shape(name, shape)
    if datatype == "BYTES":
        flat = _flatten(data, name)
        if len(flat) != n:
            raise InvalidRequestError(f"input {name!r}: {len(flat)} elements for shape {list(shape)}")
        return bytes_from_values(name, flat).reshape(shape)
    arr = from_values(name, datatype, data)
    if arr.size != n:
        raise InvalidRequestError(f"input {name!r}: {arr.size} elements for shape {list(shape)}")
    return arr.reshape(shape)


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if data and not isinstance(data[0], list) and not isinstance(data[-1], list):
        return data  # flat already (a list inside is refused as a non-string element)
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
    n = check_shape(name, shape)
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


# Byte orders that are little-endian already: "<", "|" (one byte), "=" on a little-endian machine.
_LITTLE = frozenset("<|=") if sys.byteorder == "little" else frozenset("<|")


def tensor_to_bytes(arr: np.ndarray[Any, Any], datatype: str | None = None) -> bytes:
    if (datatype or datatype_of(arr)) == "BYTES":
        parts = []
        for v in arr.reshape(-1).tolist():
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    if arr.dtype.byteorder in _LITTLE:  # no conversion: tobytes() writes C order
        return arr.tobytes()
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
            datatype = datatype_of(arr)
            raw = tensor_to_bytes(arr, datatype)
            body_outputs.append({"name": name, "datatype": datatype, "shape": list(arr.shape),
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
