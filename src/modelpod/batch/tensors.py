"""Columns -> the signature's input tensors, checked like the server checks a request; outputs -> columns.

Typed inputs (Parquet, ``.npy``) must carry the signature's datatype exactly (or a lossless integer
widening, as the server's one input check ``modelpod.inputs`` allows), checked on the schema before
a row is predicted: a ``double`` column is not an FP32 input unless ``--cast`` asks for safe casts.
Text inputs (CSV cells, JSON values) carry no width, so each value is parsed as the
signature's datatype with the server's rules (integers only into INT tensors, numbers that fit,
``true``/``false`` for BOOL). A value that does not parse, an empty cell, a missing key or a list of
the wrong length makes that row bad: it is quarantined with its reason, the other rows go on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpod.batch.sources import IMAGE_BYTES, IMAGE_PATH, NPY_COLUMN, RawBatch, pyarrow
from modelpod.errors import BatchError, InvalidRequestError
from modelpod.inputs import accepts
from modelpod.pod import DATATYPES, Signature, TensorSpec, datatype_of
from modelpod.protocols.codec import tensor_from_json

Arrays = dict[str, np.ndarray[Any, Any]]
_ARROW_NAMES = {"bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
                "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "halffloat": "FP16",
                "float": "FP32", "double": "FP64", "string": "BYTES", "large_string": "BYTES",
                "binary": "BYTES", "large_binary": "BYTES", "string_view": "BYTES", "binary_view": "BYTES"}


@dataclass(frozen=True)
class Binding:
    """The columns that make one input: one column (scalars, lists or arrays) or several stacked."""

    spec: TensorSpec
    columns: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.spec.name, "datatype": self.spec.datatype, "columns": list(self.columns)}


@dataclass
class Converted:
    inputs: Arrays  # good rows only
    good: np.ndarray[Any, Any]  # offsets (within the batch) of the good rows
    bad: dict[int, str]  # offset -> reason


def bind(signature: Signature, available: Sequence[str] | None, fmt: str, *, columns: Sequence[str] | None = None,
         input_map: Mapping[str, Sequence[str]] | None = None, keep: Sequence[str] = (),
         where: str = "") -> list[Binding]:
    """Which columns feed which input: ``input_map``, else ``columns`` (one input), else by name."""
    if not signature.inputs:
        raise BatchError("the pod has no input signature, so columns cannot be mapped to inputs; "
                         "repack it with --sample")
    specs = {t.name: t for t in signature.inputs}
    out: dict[str, Binding] = {}
    for name, cols in (input_map or {}).items():
        if name not in specs:
            raise BatchError(f"--input-map {name}=...: the model has no input {name!r}; inputs: {', '.join(specs)}")
        out[name] = Binding(specs[name], tuple(cols))
    if columns:
        if len(specs) != 1:
            raise BatchError(f"--columns feeds a single input, but the model takes {len(specs)} "
                             f"({', '.join(specs)}); use --input-map NAME=COL,... for each")
        only = signature.inputs[0]
        out[only.name] = Binding(only, tuple(columns))
    rest = [t for t in signature.inputs if t.name not in out]
    for spec in rest:
        if fmt in ("npy", "images") and len(signature.inputs) == 1:
            out[spec.name] = Binding(spec, (NPY_COLUMN if fmt == "npy" else IMAGE_BYTES,))
        elif available is None or spec.name in available:
            out[spec.name] = Binding(spec, (spec.name,))
        elif len(signature.inputs) == 1 and len(spec.shape) == 2 and spec.shape[1] > 0 and available is not None:
            free = [c for c in available if c not in keep]
            if len(free) != spec.shape[1]:
                raise BatchError(
                    f"input {spec.name!r} takes {spec.shape[1]} values per row, and {where or 'the input'} has "
                    f"{len(free)} other columns ({', '.join(free[:12])}{'…' if len(free) > 12 else ''}); "
                    f"choose them with --columns a,b,c")
            out[spec.name] = Binding(spec, tuple(free))
        else:
            raise BatchError(f"input {spec.name!r}: {where or 'the input'} has no column {spec.name!r} "
                             f"(columns: {', '.join(available or [])}); map it with --input-map {spec.name}=COL,...")
    bindings = [out[t.name] for t in signature.inputs]
    outputs = {t.name for t in signature.outputs}
    clash = sorted(outputs & set(keep))
    if clash:
        raise BatchError(f"--keep-columns {', '.join(clash)}: the model writes an output of that name; "
                         "keep the column under another name or leave it out")
    for b in bindings:
        if available is not None:
            missing = [c for c in (*b.columns, *keep) if c not in available]
            if missing:
                raise BatchError(f"{where or 'the input'} has no column {', '.join(map(repr, missing))} "
                                 f"(columns: {', '.join(available)}); check --columns, --input-map and --keep-columns")
        if len(b.columns) > 1 and not (len(b.spec.shape) == 2 and b.spec.shape[1] in (-1, len(b.columns))):
            want = b.spec.shape[1] if len(b.spec.shape) == 2 else "one"
            raise BatchError(f"input {b.spec.name!r} has shape {list(b.spec.shape)}: {len(b.columns)} columns "
                             f"({', '.join(b.columns)}) cannot be stacked into it; name {want} columns")
    return bindings


def needed_columns(bindings: Sequence[Binding], keep: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([c for b in bindings for c in b.columns] + list(keep)))


def _inner(spec: TensorSpec, stacked: int) -> tuple[int, ...]:
    """The per-row shape one column must give (stacked columns give one value each)."""
    return () if stacked > 1 else tuple(spec.shape[1:])


def arrow_datatype(t: Any) -> tuple[str | None, int]:
    """(OIP datatype of the innermost values, list depth) of an Arrow type."""
    pa = pyarrow()
    depth = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t, depth = t.value_type, depth + 1
    return _ARROW_NAMES.get(str(t) if not pa.types.is_dictionary(t) else ""), depth


def check_schema(schema: Any, bindings: Sequence[Binding], cast: bool, where: str) -> None:
    """Refuse Parquet columns whose type does not fit their input (before any row is read)."""
    for b in bindings:
        for col in b.columns:
            field = schema.field(col)
            got, depth = arrow_datatype(field.type)
            inner = _inner(b.spec, len(b.columns))
            if got is None or (not accepts(b.spec.datatype, got) and not (cast and _castable(got, b.spec.datatype))):
                hint = " (or pass --cast for safe casts)" if got not in (None, "BYTES") else ""
                raise BatchError(f"{where}: column {col!r} is {field.type}, but input {b.spec.name!r} takes "
                                 f"{b.spec.datatype}; write the column as {_arrow_of(b.spec.datatype)}{hint}")
            scalar_fits = all(d == 1 for d in inner)
            if (depth == 0 and not scalar_fits) or (depth > 0 and not inner):
                raise BatchError(f"{where}: column {col!r} is {field.type}, but input {b.spec.name!r} has shape "
                                 f"{list(b.spec.shape)}: each row needs {list(inner) or 'one value'}")


def check_array(arr: np.ndarray[Any, Any], binding: Binding, cast: bool, where: str) -> None:
    got = datatype_of(arr)
    spec = binding.spec
    if not accepts(spec.datatype, got) and not (cast and _castable(got, spec.datatype)):
        raise BatchError(f"{where}: the array is {arr.dtype}, but input {spec.name!r} takes {spec.datatype}; "
                         f"save it as {DATATYPES[spec.datatype]}" + (" (or pass --cast)" if got != "BYTES" else ""))
    if not spec.accepts_shape((arr.shape[0] if arr.ndim else 1, *arr.shape[1:])):
        raise BatchError(f"{where}: rows of shape {list(arr.shape[1:])} do not fit input {spec.name!r} "
                         f"of shape {list(spec.shape)}")


def _castable(got: str, want: str) -> bool:
    return "BYTES" not in (got, want) or got == want


def _arrow_of(datatype: str) -> str:
    return {"FP32": "float32", "FP64": "float64", "FP16": "float16", "BYTES": "string", "BOOL": "bool"}.get(
        datatype, datatype.lower())


# -- converting a batch -----------------------------------------------------------------------------
def convert(raw: RawBatch, fmt: str, bindings: Sequence[Binding], cast: bool, missing_nan: bool = False
            ) -> Converted:
    """The good rows of a batch as input arrays, and the reason each bad row was left out.

    ``missing_nan``: an empty cell, null or missing key of a float column is NaN, a missing value the
    model handles (table signatures: pandas' NaN), rather than a bad row."""
    bad = dict(raw.bad)
    arrays: Arrays = {}
    for b in bindings:
        inner = _inner(b.spec, len(b.columns))
        parts = []
        for col in b.columns:
            data = raw.columns[col]
            if missing_nan and b.spec.datatype in _FLOATS and not inner:
                data = _missing_as_nan(data, fmt)
            values, why = _column(data, fmt, b.spec, col, inner, cast, raw.rows)
            for k, reason in why.items():
                bad.setdefault(k, reason)
            parts.append(values)
        arr = parts[0] if len(parts) == 1 else np.stack(parts, axis=1)
        want = (raw.rows, *[d if d != -1 else s for d, s in zip(b.spec.shape[1:], arr.shape[1:], strict=False)])
        if arr.shape != want and arr.size == int(np.prod(want)):
            arr = arr.reshape(want)
        arrays[b.spec.name] = arr
    if bad:
        good = np.array([k for k in range(raw.rows) if k not in bad], dtype=np.int64)
        arrays = {k: v[good] for k, v in arrays.items()}
    else:
        good = np.arange(raw.rows, dtype=np.int64)
    return Converted(arrays, good, bad)


_FLOATS = frozenset(("FP16", "FP32", "FP64"))


def _missing_as_nan(data: Any, fmt: str) -> Any:
    if isinstance(data, list):
        return [float("nan") if v is None else v for v in data]
    if isinstance(data, np.ndarray) or not data.null_count and fmt != "csv":
        return data
    pa = pyarrow()
    import pyarrow.compute as pc

    if fmt == "csv":
        return pc.if_else(pc.equal(data, ""), pa.scalar("nan"), data)
    return pc.fill_null(data, float("nan")) if pa.types.is_floating(data.type) else data


def _column(data: Any, fmt: str, spec: TensorSpec, col: str, inner: tuple[int, ...], cast: bool,
            rows: int) -> tuple[np.ndarray[Any, Any], dict[int, str]]:
    if fmt == "jsonl":
        return _from_json(data, spec, col, inner)
    if isinstance(data, np.ndarray):
        if not accepts(spec.datatype, datatype_of(data)):  # --cast (checked on the schema before)
            return data.astype(DATATYPES[spec.datatype]), {}
        return data, {}
    if isinstance(data, list):  # image bytes
        return _bytes_array(data), {}
    return _from_arrow(data, spec, col, inner, cast, text=fmt == "csv")


def _bytes_array(values: Sequence[Any]) -> np.ndarray[Any, Any]:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode() if isinstance(v, str) else (b"" if v is None else bytes(v)) for v in values]
    return out


def _from_json(values: list[Any], spec: TensorSpec, col: str, inner: tuple[int, ...]
               ) -> tuple[np.ndarray[Any, Any], dict[int, str]]:
    shape = tuple(d if d != -1 else _free_dim(values, i) for i, d in enumerate(inner))
    try:
        if any(v is None for v in values):
            raise InvalidRequestError("missing")
        return tensor_from_json(col, spec.datatype, (len(values), *shape), values), {}
    except (InvalidRequestError, ValueError, TypeError):
        pass
    bad: dict[int, str] = {}
    out = np.zeros((len(values), *shape), dtype=DATATYPES[spec.datatype])
    for k, v in enumerate(values):
        if v is None:
            bad[k] = f"column {col!r} is missing"
            continue
        try:
            one = tensor_from_json(col, spec.datatype, shape, v)
            out[k] = one.item() if one.ndim == 0 else one
        except (InvalidRequestError, ValueError, TypeError) as exc:
            bad[k] = f"column {col!r}: {exc} (value {_short(v)})"
    return out, bad


def _free_dim(values: list[Any], level: int) -> int:
    for v in values:
        for _ in range(level):
            v = v[0] if isinstance(v, list) and v else None
        if isinstance(v, list):
            return len(v)
    return 0


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_list(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _from_arrow(arr: Any, spec: TensorSpec, col: str, inner: tuple[int, ...], cast: bool, text: bool
                ) -> tuple[np.ndarray[Any, Any], dict[int, str]]:
    pa = pyarrow()
    import pyarrow.compute as pc

    bad: dict[int, str] = {}
    rows = len(arr)
    if arr.null_count:
        for null in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)):
            bad[int(null)] = f"column {col!r} is empty (null)"
    if not _is_list(pa, arr.type):
        if arr.null_count:
            arr = pc.fill_null(arr, "" if arrow_datatype(arr.type)[0] == "BYTES" else 0)
        values, why = _scalars(arr, spec, col, cast, text)
        for k, reason in why.items():
            bad.setdefault(k, reason)
        return values, bad
    # A list column: each row holds the values of one row's tensor (nested lists: row-major).
    lens = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
    dims = [d for d in inner]
    if dims and dims[0] == -1:
        seen = lens[lens >= 0]
        dims[0] = int(seen[0]) if len(seen) else 0
    size = int(np.prod(dims)) if dims else 1
    top = dims[0] if dims else 1
    for wrong in np.flatnonzero(lens != top):
        if lens[wrong] >= 0:
            bad.setdefault(int(wrong), f"column {col!r} holds {int(lens[wrong])} values, input {spec.name!r} "
                                       f"takes {top}")
    ok = np.array([k not in bad for k in range(rows)], dtype=bool)
    idx = np.flatnonzero(ok)
    flat = arr.filter(pa.array(ok)) if len(idx) != rows else arr
    while _is_list(pa, flat.type):
        flat = flat.flatten()
    full = np.zeros((rows, *dims), dtype=DATATYPES[spec.datatype])
    if len(flat) != len(idx) * size:
        for row in idx:
            bad.setdefault(int(row), f"column {col!r}: nested lists do not have shape {dims}")
        return full, bad
    values, why = _scalars(flat, spec, col, cast, text)
    for j, reason in why.items():
        bad.setdefault(int(idx[j // max(size, 1)]), reason)
    full[idx] = values.reshape(len(idx), *dims)
    return full, bad


def _scalars(arr: Any, spec: TensorSpec, col: str, cast: bool, text: bool
             ) -> tuple[np.ndarray[Any, Any], dict[int, str]]:
    """A flat Arrow array as a numpy array of the spec's datatype; offsets of values that do not fit."""
    pa = pyarrow()
    import pyarrow.compute as pc

    if spec.datatype == "BYTES":
        return _bytes_array(arr.to_pylist()), {}
    target = pa.from_numpy_dtype(DATATYPES[spec.datatype])
    got, _ = arrow_datatype(arr.type)
    if got is not None and accepts(spec.datatype, got):  # the same, or a lossless integer widening
        return arr.to_numpy(zero_copy_only=False), {}
    if not (text or cast):
        raise BatchError(f"column {col!r} is {arr.type}, input {spec.name!r} takes {spec.datatype}; "
                         "write it with that type or pass --cast")
    if text and spec.datatype in ("FP16",):
        target = pa.float32()
    try:
        out = pc.cast(arr, target, safe=True).to_numpy(zero_copy_only=False)
        return out.astype(DATATYPES[spec.datatype], copy=False), {}
    except (ValueError, TypeError, OverflowError):
        pass
    bad: dict[int, str] = {}
    out = np.zeros(len(arr), dtype=DATATYPES[spec.datatype])
    for k in range(len(arr)):
        item = arr.slice(k, 1)
        try:
            out[k] = pc.cast(item, target, safe=True).to_numpy(zero_copy_only=False)[0]
        except (ValueError, TypeError, OverflowError):
            value = item[0].as_py()
            bad[k] = (f"column {col!r} is empty" if value == "" else
                      f"column {col!r}: {_short(value)} is not {spec.datatype}")
    return out, bad


# -- what a row looked like, for the errors file ----------------------------------------------------
def row_values(raw: RawBatch, offset: int, columns: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in columns:
        if c == IMAGE_BYTES or c not in raw.columns:
            continue
        data = raw.columns[c]
        if isinstance(data, np.ndarray):
            continue
        value = data[offset] if isinstance(data, list) else data[offset].as_py()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[c] = value if isinstance(value, (str, int, float, bool, type(None))) else _short(value)
    return out


# -- outputs and kept columns -> Arrow ----------------------------------------------------------------
def kept_arrays(raw: RawBatch, keep: Sequence[str], good: np.ndarray[Any, Any]) -> dict[str, Any]:
    pa = pyarrow()
    out: dict[str, Any] = {}
    # ``good`` may repeat rows (one per detection of an image): all rows only when it is every row once.
    all_rows = len(good) == raw.rows and bool((np.asarray(good) == np.arange(raw.rows)).all())
    for c in keep:
        data = raw.columns[c]
        if isinstance(data, list):
            values = data if all_rows else [data[int(k)] for k in good]
            try:
                out[c] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed JSON types: keep their text
                out[c] = pa.array([v if isinstance(v, str) or v is None else str(v) for v in values], pa.string())
        else:
            out[c] = data if all_rows else data.take(pa.array(good))
    return out


def output_arrays(outputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    pa = pyarrow()
    out: dict[str, Any] = {}
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "OSU":
            items = arr.reshape(-1).tolist()
            if _all_text(arr):
                base = pa.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in items], pa.string())
            else:
                base = pa.array([v if isinstance(v, bytes) else str(v).encode() for v in items], pa.binary())
        else:
            base = pa.array(np.ascontiguousarray(arr).reshape(-1))
        for d in reversed(arr.shape[1:]):
            base = pa.FixedSizeListArray.from_arrays(base, int(d))
        out[name] = base
    return out


def _all_text(arr: np.ndarray[Any, Any]) -> bool:
    if arr.dtype.kind == "U":
        return True
    try:
        for v in arr.reshape(-1).tolist():
            if isinstance(v, bytes):
                v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


__all__ = ["IMAGE_PATH", "Binding", "Converted", "bind", "check_array", "check_schema", "convert", "kept_arrays",
           "needed_columns", "output_arrays", "row_values"]
