"""Table signatures: a pandas DataFrame as one OIP input per column, and back.

A table signature has one input per column, in the frame's order, each of shape ``[-1]`` with
the column's OIP datatype (BYTES for strings, BOOL, INT64, FP64, ... as trained). Its
``parameters`` say ``content_type: "pd"`` (MLServer's name for its pandas codec) and record each
column's pandas dtype (and a categorical column's categories), so the model is handed a DataFrame
with the dtypes it was trained on, string columns holding ``str``.

Requests send the columns as inputs (``[N]`` or ``[N, 1]`` each, the layouts MLServer's pandas
codec and KServe clients use), or, as a convenience, one BYTES input named ``records`` whose
elements are JSON objects (``{"column": value, ...}``, ``null`` for a missing value), or JSON
arrays of such objects.

pandas is needed only where a table is built or read (``pip install 'modelpod[tables]'``);
Parquet samples also need pyarrow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError, MissingExtraError, SignatureError, UsageError
from modelpod.inputs import MAX_ELEMENTS, InputCheck, check_shape, from_values
from modelpod.pod import Signature, TensorSpec, datatype_of, numpy_dtype

CONTENT_TYPE = "pd"
RECORDS = "records"
_FLOATS = ("FP16", "FP32", "FP64")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".jsonl", ".ndjson")
Batch = dict[str, np.ndarray[Any, Any]]


def pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise MissingExtraError("tables", "pandas", "tables (DataFrames, CSV, Parquet, JSONL)") from None
    return pd


def is_frame(obj: Any) -> bool:
    """Whether ``obj`` is a pandas DataFrame (without importing pandas)."""
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pandas")


def is_table_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_table(path: str | Path) -> Any:
    """A DataFrame from a .csv, .parquet or .jsonl file; errors name the file."""
    pd = pandas()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(p)
        if suffix in (".parquet", ".pq"):
            try:
                import pyarrow  # noqa: F401 - pandas' Parquet engine
            except ImportError:
                raise MissingExtraError("tables", "pyarrow", "Parquet files") from None
            return pd.read_parquet(p)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(p, lines=True)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise SignatureError(f"{p}: cannot read it as a table: {str(exc).splitlines()[0] if str(exc) else exc}"
                             ) from None
    raise UsageError(f"{p}: use .csv, .parquet or .jsonl for a table")


# -- frame -> signature and batch --------------------------------------------------------------
def _column_datatype(name: str, series: Any) -> str:
    pd = pandas()
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cats = np.asarray(dtype.categories)
        return "BYTES" if cats.dtype.kind in "OUS" else datatype_of(cats)
    kind = getattr(dtype, "kind", "O")
    if kind in "biuf" and not pd.api.types.is_object_dtype(dtype):
        try:
            return datatype_of(np.empty(0, dtype=getattr(dtype, "numpy_dtype", dtype)))
        except (SignatureError, TypeError):
            pass
    if pd.api.types.is_string_dtype(dtype):
        odd = [v for v in series if not _missing(v) and not isinstance(v, (str, bytes))]
        if not odd:
            return "BYTES"
        raise SignatureError(
            f"column {name!r} mixes strings with {type(odd[0]).__name__} values; give it one type before training")
    raise SignatureError(
        f"column {name!r} has dtype {dtype}, which a table signature cannot carry; "
        "convert it to numbers, booleans or strings")


def _missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(value != value)
    return type(value).__name__ in ("NAType", "NaTType")


def frame_signature(df: Any) -> Signature:
    """The table signature of a DataFrame (inputs only; outputs come from a prediction)."""
    if not len(df.columns):
        raise SignatureError("the sample table has no columns")
    names = list(df.columns)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise SignatureError(f"table columns must have string names; got {bad[:3]!r}")
    if len(set(names)) != len(names):
        raise SignatureError("the sample table has duplicate column names")
    pd = pandas()
    inputs: list[TensorSpec] = []
    dtypes: dict[str, str] = {}
    categories: dict[str, list[Any]] = {}
    for name in names:
        series = df[name]
        inputs.append(TensorSpec(name, _column_datatype(name, series), (-1,)))
        dtypes[name] = str(series.dtype)
        if isinstance(series.dtype, pd.CategoricalDtype):
            categories[name] = np.asarray(series.dtype.categories).tolist()
    params: dict[str, Any] = {"content_type": CONTENT_TYPE, "dtypes": dtypes}
    if categories:
        params["categories"] = categories
    return Signature(tuple(inputs), (), params)


def only_columns(params: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Table parameters kept to the given columns (the ones a model was trained on)."""
    out = dict(params)
    for key in ("dtypes", "categories"):
        if key in out:
            given = dict(out[key])
            out[key] = {n: given[n] for n in names if n in given}
            if not out[key] and key == "categories":
                del out[key]
    return out


def frame_batch(df: Any, signature: Signature | None = None) -> Batch:
    """A DataFrame as one array per column (BYTES columns as object arrays of bytes, None if missing)."""
    sig = signature if signature is not None and signature.is_table else frame_signature(df)
    missing = [t.name for t in sig.inputs if t.name not in df.columns]
    if missing:
        raise SignatureError(f"the table lacks column(s) {', '.join(missing)}; the model's columns are "
                             f"{', '.join(t.name for t in sig.inputs)}")
    batch: Batch = {}
    for spec in sig.inputs:
        series = df[spec.name]
        if spec.datatype == "BYTES":
            batch[spec.name] = _bytes_column([None if _missing(v) else v for v in series.tolist()])
            continue
        values = series.to_numpy(dtype=object) if series.hasnans else series.to_numpy()
        batch[spec.name] = _typed(spec, values.tolist() if values.dtype == object else values)
    return batch


def frame_matrix(df: Any) -> np.ndarray[Any, Any]:
    """An all-numeric DataFrame as one 2-D array (for models that take a matrix, not a table)."""
    pd = pandas()
    odd = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c].dtype)]
    if odd:
        raise SignatureError(f"this model takes one numeric matrix; column(s) {', '.join(odd)} are not numeric")
    return np.asarray(df.to_numpy())


def table_inputs(df: Any, signature: Signature) -> Batch:
    """A DataFrame as a model's inputs: its columns for a table signature, else one numeric matrix."""
    if signature.is_table or signature.empty:
        return frame_batch(df, signature)
    name = signature.inputs[0].name if len(signature.inputs) == 1 else "input-0"
    return {name: frame_matrix(df)}


def _bytes_column(values: Sequence[Any]) -> np.ndarray[Any, Any]:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.encode() if isinstance(v, str) else v for v in values]
    return out


def _typed(spec: TensorSpec, values: Any) -> np.ndarray[Any, Any]:
    """One column's values as its datatype: missing values NaN in float columns, refused elsewhere."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(numpy_dtype(spec.datatype), copy=False)
    values = list(values)
    if any(_missing(v) for v in values):
        if numpy_dtype(spec.datatype).kind != "f":
            raise InvalidRequestError(f"column {spec.name!r} ({spec.datatype}) cannot hold missing values")
        values = [math.nan if _missing(v) else v for v in values]
    return from_values(spec.name, spec.datatype, [v.item() if isinstance(v, np.generic) else v for v in values])


# -- requests -> columns -----------------------------------------------------------------------
def normalize(inputs: Mapping[str, Any], signature: Signature) -> Mapping[str, Any]:
    """Columns as 1-D values: a ``records`` input expanded, ``[N, 1]`` columns flattened."""
    if set(inputs) == {RECORDS} and signature.input(RECORDS) is None:
        return records_batch(inputs[RECORDS], signature)
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 1:
            value = value.reshape(-1)
        elif isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 1 for v in value):
            value = [v[0] for v in value]
        out[name] = value
    return out


class TableCheck(InputCheck):
    """The input check of a table signature, which also takes the table's conveniences.

    A ``records`` input (expanded to the columns), ``[N, 1]`` columns, and missing values (None)
    in string columns and in float ones (as NaN). Decoding checks only each input's header, so
    ``typed`` is False: the engine then runs ``arrays`` on the decoded inputs, which expands them.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "typed", False)

    def _records(self, name: str) -> bool:
        return name == RECORDS and RECORDS not in self._specs

    def names(self, names: Iterable[str], count: int) -> None:
        given = set(names)
        if not (count == 1 and len(given) == 1 and self._records(next(iter(given)))):
            super().names(given, count)

    def header(self, name: str, datatype: str, shape: Sequence[int], max_elements: int = MAX_ELEMENTS) -> int:
        if self._records(name):
            if datatype != "BYTES":
                raise InvalidRequestError("input 'records' must be BYTES: one JSON object per row")
            return check_shape(name, shape, max_elements)
        if len(shape) == 2 and shape[1] == 1:
            shape = shape[:1]
        return super().header(name, datatype, shape, max_elements)

    def json_data(self, name: str, datatype: str, data: Any) -> Any:
        # JSON has no NaN: null is a missing value in a float column.
        if datatype in _FLOATS and isinstance(data, list) and None in data:
            return [math.nan if v is None else v for v in data]
        return data

    def finish(self, name: str, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self._records(name):
            return arr
        return super().finish(name, arr.reshape(-1) if arr.ndim == 2 and arr.shape[1] == 1 else arr)

    def arrays(self, inputs: Mapping[str, Any]) -> Batch:
        return super().arrays(normalize(inputs, self.signature))

    def _array(self, name: str, value: Any, spec: TensorSpec | None) -> np.ndarray[Any, Any]:
        if spec is not None and spec.datatype == "BYTES":
            return _text_column(name, value)
        if spec is not None and not (isinstance(value, np.ndarray) and value.dtype != object):
            return _typed(spec, value.tolist() if isinstance(value, np.ndarray) else value)
        return super()._array(name, value, spec)


def input_check(signature: Signature, model: str = "model", nonfinite: str = "pass") -> InputCheck:
    """The input check for a signature: a ``TableCheck`` for a table, else the plain one."""
    kind = TableCheck if signature.is_table else InputCheck
    return kind(signature, model, nonfinite)


def _text_column(name: str, value: Any) -> np.ndarray[Any, Any]:
    items = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else list(value)
    odd = next((v for v in items if v is not None and not isinstance(v, (str, bytes))), None)
    if odd is not None:
        raise InvalidRequestError(f"column {name!r}: {odd!r} is not a string")
    return _bytes_column(items)


def records_batch(value: Any, signature: Signature) -> Batch:
    """The ``records`` convenience input: JSON objects (one per row, or arrays of them) -> columns."""
    rows: list[Any] = []
    for item in np.asarray(value, dtype=object).reshape(-1).tolist():
        if isinstance(item, (bytes, str)):
            try:
                item = json.loads(item)
            except ValueError:
                raise InvalidRequestError("input 'records': each element must be a JSON object or array") from None
        rows.extend(item if isinstance(item, list) else [item])
    if not all(isinstance(r, dict) for r in rows):
        raise InvalidRequestError("input 'records': each record must be a JSON object of column -> value")
    names = {t.name for t in signature.inputs}
    unknown = sorted({k for r in rows for k in r} - names)
    if unknown:
        raise InvalidRequestError(f"input 'records': unknown column(s) {', '.join(unknown[:5])}; "
                                  f"columns: {', '.join(t.name for t in signature.inputs)}")
    batch: Batch = {}
    for spec in signature.inputs:
        column = [r.get(spec.name) for r in rows]
        if spec.datatype == "BYTES":
            odd = next((v for v in column if v is not None and not isinstance(v, str)), None)
            if odd is not None:
                raise InvalidRequestError(f"column {spec.name!r}: {odd!r} is not a string")
            batch[spec.name] = _bytes_column(column)
        else:
            batch[spec.name] = _typed(spec, column)
    return batch


# -- batch -> frame ----------------------------------------------------------------------------
def to_frame(inputs: Mapping[str, np.ndarray[Any, Any]], signature: Signature) -> Any:
    """The DataFrame a table model is given: columns in signature order, trained dtypes, str strings."""
    pd = pandas()
    params = signature.parameters
    dtypes: Mapping[str, str] = params.get("dtypes") or {}
    categories: Mapping[str, Sequence[Any]] = params.get("categories") or {}
    specs = signature.inputs if signature.inputs else tuple(
        TensorSpec(n, datatype_of(np.asarray(a)), (-1,)) for n, a in inputs.items())
    columns: dict[str, Any] = {}
    for spec in specs:
        values = np.asarray(inputs[spec.name])
        values = values.reshape(len(values), -1)[:, 0] if values.ndim > 1 else values
        if spec.datatype == "BYTES" or values.dtype.kind in "OS":
            values = np.asarray([_text(v) for v in values.tolist()], dtype=object)
        wanted = dtypes.get(spec.name)
        if spec.name in categories:
            dtype: Any = pd.CategoricalDtype(list(categories[spec.name]))
        elif wanted:
            dtype = pd.api.types.pandas_dtype(wanted)
        else:
            dtype = None
        columns[spec.name] = pd.Series(values, dtype=dtype, copy=False)
    return pd.DataFrame(columns)


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value
