"""The one input check: every tensor a model receives passes here, whatever carried it.

REST and gRPC call it twice over one request: ``InputCheck.header`` on each input's name, datatype
and shape *before* its data is decoded (so a request naming a million inputs, or a shape no body
could hold, costs nothing), then ``InputCheck.finish`` on the decoded array. In-process predict
(``Model.__call__``, ``modelpod predict``) and batch jobs call ``check_inputs`` on arrays.

Rules (docs/serving.md has the table):

- datatypes match the signature exactly, or are a lossless widening: an integer to a wider
  integer of the same signedness (INT8 -> INT16/INT32/INT64, UINT8 -> UINT16/..., and so on).
  Nothing else is converted: FP32 or INT64 data for an FP64 input is refused;
- values that carry no type of their own (JSON numbers, Python lists) are converted to the
  signature's type only when they fit it: integers in range, no floats or booleans for integers,
  no strings or booleans for floats;
- shapes: at most ``MAX_DIMS`` dimensions, no dimension or element count beyond what a request can
  hold, no empty tensor (zero rows), and the signature's fixed dimensions;
- NaN/Infinity: passed to the model (``nonfinite: pass``, the default) or refused (``reject``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError, SignatureError
from modelpod.pod import DATATYPES, Signature, TensorSpec, datatype_of

Batch = dict[str, np.ndarray[Any, Any]]

MAX_DIMS = 64
# No dimension and no element count above this is possible in any request (2**40 elements of even
# one byte would be a terabyte); it keeps shape arithmetic away from numpy's int64 overflow.
MAX_ELEMENTS = 1 << 40
NONFINITE = ("pass", "reject")
STEP = 1 << 16  # elements converted per numpy call
FLAT_SCAN = 128  # flat lists shorter than this are scanned for booleans; longer ones checked with numpy

# Received datatype -> the signature datatypes it may be widened to without loss.
_SIGNED = ("INT8", "INT16", "INT32", "INT64")
_UNSIGNED = ("UINT8", "UINT16", "UINT32", "UINT64")
WIDENINGS: dict[str, tuple[str, ...]] = {
    **{t: _SIGNED[i + 1:] for i, t in enumerate(_SIGNED)},
    **{t: _UNSIGNED[i + 1:] for i, t in enumerate(_UNSIGNED)},
}
_INTEGERS = frozenset(_SIGNED + _UNSIGNED)
_FLOATS = frozenset(("FP16", "FP32", "FP64"))
_NARROW_FLOATS = frozenset(("FP16", "FP32"))
# Python types a JSON (or list) value may have for each kind of datatype.
_NUMBERS = frozenset((int, float))


def accepts(expected: str, received: str) -> bool:
    """Whether data of datatype ``received`` may feed an input of datatype ``expected``."""
    return received == expected or expected in WIDENINGS.get(received, ())


def check_shape(name: str, shape: Sequence[int], max_elements: int = MAX_ELEMENTS) -> int:
    """The element count of ``shape``; InvalidRequestError for impossible or empty shapes."""
    if len(shape) > MAX_DIMS:
        raise InvalidRequestError(f"input {name!r}: {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    n = 1
    for d in shape:
        if d > max_elements:
            raise InvalidRequestError(f"input {name!r}: dimension {d} in shape {list(shape)} is larger than any "
                                      f"request can hold ({max_elements} elements)")
        n *= d
    if n == 0:
        raise InvalidRequestError(f"input {name!r}: shape {list(shape)} holds no elements (zero rows); "
                                  "send at least one")
    if n > max_elements:
        raise InvalidRequestError(f"input {name!r}: shape {list(shape)} holds {n} elements, more than any "
                                  f"request can hold ({max_elements})")
    return n


def leaf_types(data: Any) -> set[type]:
    """The Python types of the scalars in a (nested) list, at C speed for flat rows."""
    if not isinstance(data, list):
        return {type(data)}
    types = set(map(type, data))
    if list in types:
        types.discard(list)
        for item in data:
            if isinstance(item, list):
                types |= leaf_types(item)
    return types


def from_values(name: str, datatype: str, data: Any) -> np.ndarray[Any, Any]:
    """Untyped values (JSON numbers, Python lists) as an array of ``datatype``, if they fit it.

    Long lists are converted ``STEP`` rows at a time: each numpy call holds the GIL, and a server
    decoding a big request on a thread must still let its event loop run.
    """
    if isinstance(data, list) and len(data) > STEP:
        parts = [from_values(name, datatype, data[i:i + STEP]) for i in range(0, len(data), STEP)]
        if len({p.shape[1:] for p in parts}) != 1:
            raise InvalidRequestError(f"input {name!r}: nested data rows differ in length")
        return np.concatenate(parts)
    if type(data) is list and datatype in _FLAT:
        fast = flat_numbers(datatype, data)
        if fast is not None:
            return fast
    types = set(map(type, data)) if isinstance(data, list) else {type(data)}
    if list in types:
        types = leaf_types(data)
    if datatype in _INTEGERS:
        if not types <= {int}:
            raise InvalidRequestError(f"input {name!r}: {datatype} data must be integers")
    elif datatype in _FLOATS:
        if not types <= _NUMBERS:
            raise InvalidRequestError(f"input {name!r}: {datatype} data must be numbers (not strings or booleans)")
    elif datatype == "BOOL" and not types <= {bool}:
        raise InvalidRequestError(f"input {name!r}: BOOL data must be true/false")
    try:
        # Out of range values are refused: 300 for INT8 (OverflowError), 1e300 for FP32 (over:
        # only narrower floats need the errstate, which costs more than the conversion).
        if datatype in _NARROW_FLOATS:
            with np.errstate(over="raise", invalid="raise"):
                return np.asarray(data, dtype=DATATYPES[datatype])
        return np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError, FloatingPointError):
        raise InvalidRequestError(f"input {name!r}: data does not fit datatype {datatype}") from None


# Datatype -> the struct code its JSON values are packed with, in C, straight into the tensor's
# memory: struct refuses strings, None, nested lists, floats for integers and values out of the
# type's range (OverflowError for a float that would become infinite, struct.error for an integer
# out of range) itself, and converts exactly as numpy does (each value to a C double, then cast).
# No per-element type discovery, no Python float -> numpy scalar step.
_FLAT = {"FP16": "e", "FP32": "f", "FP64": "d", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
         "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q"}


def flat_numbers(datatype: str, data: list[Any]) -> np.ndarray[Any, Any] | None:
    """A flat list of numbers as ``datatype``, or None when the checked path must decide (anything
    but numbers in the list, booleans, values out of range): the same array, less work."""
    n = len(data)
    if not n:
        return None
    out = np.empty(n, dtype=DATATYPES[datatype])
    try:
        struct.pack_into(f"={n}{_FLAT[datatype]}", out.data, 0, *data)
    except (struct.error, TypeError, OverflowError):
        return None
    # struct takes booleans as numbers: a short list is scanned for them, a long one only when it
    # holds 0 or 1 at all.
    if (n < FLAT_SCAN or ((out == 0) | (out == 1)).any()) and bool in set(map(type, data)):
        return None
    return out


def bytes_from_values(name: str, flat: Sequence[Any], missing: bool = False) -> np.ndarray[Any, Any]:
    """A 1-D BYTES tensor from strings (encoded as UTF-8) or bytes; anything else is refused.

    ``missing``: ``None`` stays (a missing value in a table's string column)."""
    if missing and any(v is None for v in flat):
        return _with_missing(name, flat)
    if len(flat) > 16 * STEP:
        # np.empty of millions of objects holds the GIL for as long as it fills them with None;
        # fromiter runs the generator's bytecode, so other threads get their turns meanwhile.
        return np.fromiter(_encoded(name, flat), dtype=object, count=len(flat))
    out = np.empty(len(flat), dtype=object)
    for i in range(0, len(flat), STEP):  # in steps, for the GIL (see from_values)
        part = flat[i:i + STEP]
        types = set(map(type, part))
        if types <= {str}:
            out[i:i + len(part)] = [v.encode() for v in part]
        elif types <= {str, bytes, bytearray, np.str_, np.bytes_}:
            out[i:i + len(part)] = [v.encode() if isinstance(v, str) else bytes(v) for v in part]
        else:
            raise InvalidRequestError(f"input {name!r}: BYTES elements must be strings")
    return out


def _with_missing(name: str, flat: Sequence[Any]) -> np.ndarray[Any, Any]:
    present = [i for i, v in enumerate(flat) if v is not None]
    out = np.full(len(flat), None, dtype=object)
    if present:
        out[present] = bytes_from_values(name, [flat[i] for i in present])
    return out


def _encoded(name: str, flat: Sequence[Any]) -> Iterator[bytes]:
    for i in range(0, len(flat), STEP):
        part = flat[i:i + STEP]
        types = set(map(type, part))
        if types <= {str}:
            yield from [v.encode() for v in part]
        elif types <= {str, bytes, bytearray, np.str_, np.bytes_}:
            yield from [v.encode() if isinstance(v, str) else bytes(v) for v in part]
        else:
            raise InvalidRequestError(f"input {name!r}: BYTES elements must be strings")


def release(data: Any) -> None:
    """Empty a long list from its end, ``STEP`` items at a time: freeing millions of objects in one
    go holds the GIL (and whichever thread drops the last reference to a decoded body would)."""
    if isinstance(data, list) and len(data) > STEP:
        for end in range(len(data), 0, -STEP):
            del data[max(0, end - STEP):end]


@dataclass(frozen=True)
class InputCheck:
    """A model's signature and input policy, as the protocols and batch jobs apply them."""

    signature: Signature
    model: str = "model"
    nonfinite: str = "pass"
    _specs: Mapping[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _fast: Mapping[str, tuple[str, int, tuple[tuple[int, int], ...], np.dtype[Any]]] = field(
        init=False, repr=False, compare=False)
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    # The plain request's plan (protocols/codec.py ``decode_plain``): per input, (datatype, rank,
    # fixed dimensions), when every input is numeric and the check is this class's own rules.
    plain: Mapping[str, tuple[str, int, tuple[tuple[int, int], ...]]] | None = field(
        init=False, repr=False, compare=False)
    typed: bool = field(init=False, repr=False, compare=False)  # the signature names its inputs

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE:
            raise SignatureError(f"nonfinite must be one of {', '.join(NONFINITE)}, not {self.nonfinite!r}")
        object.__setattr__(self, "_specs", {t.name: t for t in self.signature.inputs})
        # Per input: (datatype, rank, ((axis, size) for each fixed dimension)): the hot path's checks.
        object.__setattr__(self, "_fast", {t.name: (t.datatype, len(t.shape),
                                                    tuple((i, d) for i, d in enumerate(t.shape) if d != -1),
                                                    DATATYPES[t.datatype])
                                           for t in self.signature.inputs})
        object.__setattr__(self, "_names", frozenset(self._specs))
        plain = {n: f[:3] for n, f in self._fast.items()} if type(self) is InputCheck else {}
        object.__setattr__(self, "plain", plain if plain and all(f[0] in _FLAT for f in plain.values()) else None)
        object.__setattr__(self, "typed", bool(self._specs))

    def names(self, names: Iterable[str], count: int) -> None:
        """The number of inputs, unknown names and missing ones (before decoding, from the headers)."""
        if not self.typed:
            return
        given = names if isinstance(names, (set, frozenset)) else set(names)
        if count == len(self._names) and given == self._names:
            return  # the common case: exactly the signature's inputs
        unknown = [n for n in given if n not in self._specs]
        if unknown:
            raise InvalidRequestError(
                f"model {self.model!r} has no input {unknown[0]!r}; inputs: {', '.join(self._specs)}")
        want = len(self._specs)
        if count > want:
            raise InvalidRequestError(
                f"model {self.model!r} takes {want} input(s) ({', '.join(self._specs)}); the request has {count}")
        missing = [n for n in self._specs if n not in given]
        if missing:
            raise InvalidRequestError(f"model {self.model!r}: missing input(s) {', '.join(missing)}")

    def header(self, name: str, datatype: str, shape: Sequence[int], max_elements: int = MAX_ELEMENTS) -> int:
        """Before decoding one input: its datatype and shape against the signature; its element count."""
        n = check_shape(name, shape, max_elements)
        fast = self._fast.get(name)
        if fast is None:
            if self._specs:
                raise InvalidRequestError(
                    f"model {self.model!r} has no input {name!r}; inputs: {', '.join(self._specs)}")
            return n
        want, rank, fixed, _ = fast
        if datatype != want and not accepts(want, datatype):
            raise InvalidRequestError(f"input {name!r}: expected datatype {want}, received {datatype}"
                                      + _widening_hint(want))
        fits = len(shape) == rank
        if fits:
            for i, d in fixed:
                if shape[i] != d:
                    fits = False
        if not fits:
            raise InvalidRequestError(
                f"input {name!r}: shape {list(shape)} does not match the signature's {list(self._specs[name].shape)}")
        return n

    def json_data(self, name: str, datatype: str, data: Any) -> Any:
        """One input's JSON ``data`` before it is decoded (a table check reads ``null`` as NaN)."""
        return data

    def finish(self, name: str, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """After decoding one input (already checked by ``header``): widened, non-finite policy applied."""
        fast = self._fast.get(name)
        if fast is not None and arr.dtype is not fast[3] and fast[0] != "BYTES" and arr.dtype != fast[3]:
            arr = arr.astype(fast[3])  # a widening; header() refused everything else
        if self.nonfinite == "reject" and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidRequestError(
                f"input {name!r} holds NaN or Infinity, which model {self.model!r} refuses (nonfinite: reject)")
        return arr

    def arrays(self, inputs: Mapping[str, Any]) -> Batch:
        """Arrays or plain values (in-process predict, batch jobs): the whole check in one call."""
        self.names(inputs, len(inputs))
        batch: Batch = {}
        for name, value in inputs.items():
            spec = self._specs.get(name)
            arr = self._array(name, value, spec)
            received = datatype_of(arr) if spec is None else _received(arr, spec)
            if spec is not None and not accepts(spec.datatype, received):
                raise InvalidRequestError(
                    f"input {name!r}: expected datatype {spec.datatype}, received {received} ({arr.dtype}); "
                    f"convert it first, e.g. array.astype({DATATYPES[spec.datatype].name!r})")
            self.header(name, received, arr.shape)
            batch[name] = self.finish(name, arr)
        return batch

    def _array(self, name: str, value: Any, spec: TensorSpec | None) -> np.ndarray[Any, Any]:
        if spec is None:
            return value if isinstance(value, np.ndarray) else np.asarray(value)
        if spec.datatype == "BYTES":
            arr = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
            if arr.dtype.kind not in "OUS":
                raise InvalidRequestError(
                    f"input {name!r}: expected datatype BYTES, received {datatype_of(arr)}")
            flat = arr.reshape(-1).tolist()
            return bytes_from_values(name, flat, self.signature.is_table).reshape(arr.shape)
        if isinstance(value, np.ndarray) and value.dtype.kind != "O":
            return value  # typed: its datatype must fit (header)
        # Untyped values: converted like JSON numbers, when they fit the signature's datatype.
        data = value.tolist() if isinstance(value, np.ndarray) else value
        if isinstance(data, tuple):
            data = list(data)
        return from_values(name, spec.datatype, data)


def _received(arr: np.ndarray[Any, Any], spec: TensorSpec) -> str:
    if spec.datatype == "BYTES" and arr.dtype == object:
        return "BYTES"
    try:
        return datatype_of(arr)
    except SignatureError:
        raise InvalidRequestError(f"input {spec.name!r}: numpy dtype {arr.dtype} has no OIP datatype") from None


def _widening_hint(expected: str) -> str:
    wider = [t for t, targets in WIDENINGS.items() if expected in targets]
    return f" (or a narrower integer: {', '.join(wider)})" if wider else ""


def check_inputs(signature: Signature, inputs: Mapping[str, Any], *, model: str = "model",
                 nonfinite: str = "pass") -> Batch:
    """Check (and widen) a batch of arrays or plain values against ``signature``: the one input check.

    For callers outside the servers (batch jobs, in-process predict). Raises InvalidRequestError
    (HTTP 400 / INVALID_ARGUMENT, exit 2) with a reason naming the input.
    """
    return InputCheck(signature, model, nonfinite).arrays(inputs)
