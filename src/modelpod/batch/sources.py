"""Reading batch inputs: files found from a path or glob, split into units, streamed in batches.

A *unit* is the smallest share of the input a shard takes and the order key of the output: a whole
CSV or JSON Lines file, one Parquet row group, a slice of a ``.npy`` file, a slice of an image folder.
Reading a unit yields ``RawBatch`` records of at most ``batch_rows`` rows; nothing holds more than a
batch of a unit in memory. CSV cells stay text until ``tensors`` converts them to the signature's
datatypes; JSON Lines rows are parsed with orjson, one line at a time, so one bad line is one bad row.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from modelpod.errors import BatchError, MissingExtraError

FORMATS = ("csv", "parquet", "jsonl", "npy", "images")
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".json": "jsonl", ".npy": "npy"}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
NPY_COLUMN = "array"  # the one column a .npy file offers
IMAGE_PATH, IMAGE_BYTES = "path", "image"  # the columns an image folder offers
IMAGES_PER_UNIT = 1024
NPY_ROWS_PER_UNIT = 1 << 16
_HEAD = 1 << 16  # bytes hashed at each end of a file for its fingerprint


def pyarrow() -> Any:
    """The pyarrow module, or the one-line install hint."""
    try:
        import pyarrow as pa
    except ImportError:
        raise MissingExtraError("batch", "pyarrow", "modelpod batch") from None
    return pa


def import_readers() -> None:
    """Import the pyarrow modules every job uses, as part of start-up (beside the model's load) rather
    than inside the first batch."""
    import importlib

    pyarrow()
    for name in ("pyarrow.compute", "pyarrow.csv", "pyarrow.parquet"):
        importlib.import_module(name)


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime_ns: int
    edges: str  # sha256 of the first and last 64 KiB: a cheap content check on resume

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "edges": self.edges}


@dataclass(frozen=True)
class Unit:
    """One share of the input: rows [start, start + rows) of ``file`` (rows None: up to its end)."""

    index: int
    file: str
    start: int
    rows: int | None
    weight: int  # bytes, for dividing units between shards
    row_group: int | None = None
    members: tuple[str, ...] = ()  # image files of an image-folder unit
    root: str = ""  # the folder image paths are given relative to


@dataclass
class RawBatch:
    """Rows of one unit as read: ``start`` is the file row of the first one."""

    file: str
    start: int
    rows: int
    columns: dict[str, Any]  # pyarrow arrays (csv: text, parquet: typed), lists (jsonl), ndarray (npy)
    bad: dict[int, str]  # row offset -> why it could not be read (jsonl lines that are not JSON)
    files: list[str] | None = None  # per-row source file (image folders)
    notes: list[dict[str, Any]] = field(default_factory=list)  # unreadable lines that are not rows (csv)


def detect_format(paths: Sequence[str], given: str | None) -> str:
    if given:
        if given not in FORMATS:
            raise BatchError(f"--format {given!r}: use one of {', '.join(FORMATS)}")
        return given
    kinds = {_SUFFIXES.get(Path(p).suffix.lower(), "images" if Path(p).suffix.lower() in IMAGE_SUFFIXES else "")
             for p in paths}
    if len(kinds) == 1 and "" not in kinds:
        return kinds.pop()
    raise BatchError(f"cannot tell the input format of {paths[0]}{' and others' if len(paths) > 1 else ''}: "
                     f"pass --format ({', '.join(FORMATS)})")


def find_inputs(spec: str | Sequence[str], fmt: str | None) -> tuple[str, list[str]]:
    """(format, sorted absolute paths) of a path, a directory or a glob (or a list of them)."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[str] = []
    for item in specs:
        text = str(item)
        p = Path(text).expanduser()
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if fmt == "images":  # a photo folder may hold other files (notes, sidecars): only images
                files = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
            elif fmt is not None:
                files = [f for f in files if _SUFFIXES.get(Path(f).suffix.lower()) == fmt]
            elif fmt is None and all(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files) and files:
                fmt = "images"
            elif fmt is None:
                kinds = {_SUFFIXES.get(Path(f).suffix.lower()) for f in files} - {None}
                if len(kinds) == 1:
                    fmt = kinds.pop()
                    files = [f for f in files if _SUFFIXES.get(Path(f).suffix.lower()) == fmt]
            found += files
        elif p.is_file():
            found.append(str(p))
        elif globlib.has_magic(text):
            found += sorted(str(Path(f)) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        else:
            raise BatchError(f"input {text}: no such file or directory; check the path (globs need quotes)")
    if not found:
        raise BatchError(f"input {', '.join(map(str, specs))}: no input files found; check the path or the glob")
    paths = sorted(dict.fromkeys(os.path.abspath(f) for f in found))
    return detect_format(paths, fmt), paths


def fingerprint(path: str) -> InputFile:
    try:
        st = os.stat(path)
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            h.update(fh.read(_HEAD))
            if st.st_size > 2 * _HEAD:
                fh.seek(st.st_size - _HEAD)
            h.update(fh.read(_HEAD))
    except OSError as exc:
        raise BatchError(f"input {path}: cannot read it ({exc.strerror or exc}); check it exists and is readable"
                         ) from None
    return InputFile(path, st.st_size, st.st_mtime_ns, h.hexdigest())


# -- units ------------------------------------------------------------------------------------------
def plan_units(fmt: str, paths: Sequence[str]) -> list[Unit]:
    """Every unit of the input, in input order."""
    units: list[Unit] = []
    if fmt == "images":
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        for i in range(0, len(paths), IMAGES_PER_UNIT):
            chunk = tuple(paths[i:i + IMAGES_PER_UNIT])
            weight = sum(os.path.getsize(p) for p in chunk)
            units.append(Unit(len(units), chunk[0], i, len(chunk), weight, members=chunk, root=root))
        return units
    for path in paths:
        if fmt == "parquet":
            meta = _parquet(path).metadata
            start = 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                units.append(Unit(len(units), path, start, rg.num_rows, max(1, rg.total_byte_size), row_group=g))
                start += rg.num_rows
            if meta.num_row_groups == 0:
                units.append(Unit(len(units), path, 0, 0, 1, row_group=None))
        elif fmt == "npy":
            arr = _npy(path)
            n = int(arr.shape[0]) if arr.ndim else 1
            row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
            for s in range(0, max(n, 1), NPY_ROWS_PER_UNIT):
                rows = min(NPY_ROWS_PER_UNIT, n - s)
                units.append(Unit(len(units), path, s, rows, max(1, rows * row_bytes)))
        else:
            units.append(Unit(len(units), path, 0, None, max(1, os.path.getsize(path))))
    return units


def _parquet(path: str) -> Any:
    pyarrow()
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise BatchError(f"input {path}: not a readable Parquet file ({exc}); check the file or pass --format"
                         ) from None


_opened = threading.local()  # each thread's last ParquetFile: a file's units are read one after another


def _open_parquet(path: str) -> Any:
    """The file's ParquetFile, opened (and its footer parsed) once per thread while its units are read."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    last = getattr(_opened, "last", None)
    if last is not None and last[0] == key:
        return last[1]
    pf = _parquet(path)
    _opened.last = (key, pf)
    return pf


def _npy(path: str) -> np.ndarray[Any, Any]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BatchError(f"input {path}: not a readable .npy file ({exc}); save it with numpy.save "
                         "(object arrays are refused)") from None
    if not isinstance(arr, np.ndarray):
        raise BatchError(f"input {path}: not a single array; use one .npy file per array")
    return arr


def columns_of(fmt: str, path: str) -> list[str] | None:
    """The column names a file offers (JSON Lines: the first row's keys; None when unknown)."""
    if fmt == "parquet":
        return list(_parquet(path).schema_arrow.names)
    if fmt == "csv":
        return list(_open_csv(path, None, []).schema.names)
    if fmt == "npy":
        return [NPY_COLUMN]
    if fmt == "images":
        return [IMAGE_PATH, IMAGE_BYTES]
    return _jsonl_keys(path)


def _jsonl_keys(path: str) -> list[str] | None:
    """The keys of the first JSON object in a JSON Lines file (None when it has none to show)."""
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    obj = orjson.loads(line)
                    return list(obj) if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None
    return None


def schema_of(fmt: str, path: str) -> Any:
    """The Arrow schema of a Parquet file (types are checked before any row is predicted)."""
    return _parquet(path).schema_arrow if fmt == "parquet" else None


# -- reading ----------------------------------------------------------------------------------------
def read_unit(fmt: str, unit: Unit, columns: Sequence[str], batch_rows: int, skip: int = 0) -> Iterator[RawBatch]:
    """Batches of a unit's rows from row offset ``skip`` on (offsets relative to ``unit.start``)."""
    try:
        if fmt == "parquet":
            yield from _read_parquet(unit, columns, batch_rows, skip)
        elif fmt == "csv":
            yield from _read_csv(unit, columns, batch_rows, skip)
        elif fmt == "jsonl":
            yield from _read_jsonl(unit, columns, batch_rows, skip)
        elif fmt == "npy":
            yield from _read_npy(unit, batch_rows, skip)
        else:
            yield from _read_images(unit, batch_rows, skip)
    except BatchError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise BatchError(f"input {unit.file}: cannot read it past row {unit.start + skip} "
                         f"({type(exc).__name__}: {exc}); fix or replace the file and rerun") from None


def _read_parquet(unit: Unit, columns: Sequence[str], batch_rows: int, skip: int) -> Iterator[RawBatch]:
    if unit.row_group is None:
        return
    pf = _open_parquet(unit.file)
    at = unit.start
    for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[unit.row_group], columns=list(columns)):
        n = rb.num_rows
        offset = at - unit.start
        at += n
        if offset + n <= skip:
            continue
        cut = max(0, skip - offset)
        cols = {name: rb.column(i).slice(cut) for i, name in enumerate(rb.schema.names)}
        yield RawBatch(unit.file, unit.start + offset + cut, n - cut, cols, {})


def _open_csv(path: str, columns: Sequence[str] | None, invalid: list[dict[str, Any]] | None = None) -> Any:
    pa = pyarrow()
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False)
    if columns is not None:
        convert = pcsv.ConvertOptions(include_columns=list(columns), column_types={c: pa.string() for c in columns},
                                      strings_can_be_null=False, quoted_strings_can_be_null=False)
    parse = pcsv.ParseOptions()
    if invalid is not None:
        def handler(row: Any) -> str:
            invalid.append({"line": row.number, "reason": f"expected {row.expected_columns} fields, "
                            f"found {row.actual_columns}", "text": (row.text or "")[:200]})
            return "skip"

        parse = pcsv.ParseOptions(invalid_row_handler=handler)
    read = pcsv.ReadOptions(block_size=1 << 20, use_threads=False)
    try:
        return pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (OSError, ValueError) as exc:
        raise BatchError(f"input {path}: not a readable CSV file ({exc}); it needs a header row of column names"
                         ) from None


def _read_csv(unit: Unit, columns: Sequence[str], batch_rows: int, skip: int) -> Iterator[RawBatch]:
    """Rows that have the wrong number of fields are reported (by line) with the batch read after them."""
    pa = pyarrow()
    invalid: list[dict[str, Any]] = []
    reader = _open_csv(unit.file, columns, invalid)
    at = 0  # file row of the first pending row
    pending: list[Any] = []
    held = 0

    def emit(table: Any, n: int) -> RawBatch:
        notes = invalid[:]
        invalid.clear()
        return RawBatch(unit.file, at, n, {c: table.column(c).combine_chunks() for c in columns}, {}, notes=notes)

    for rb in reader:
        if at + held + rb.num_rows <= skip:  # committed before: read past it
            at += rb.num_rows
            invalid.clear()
            continue
        pending.append(rb)
        held += rb.num_rows
        if at < skip:
            table = pa.Table.from_batches(pending).slice(skip - at)
            pending, held, at = table.to_batches(), table.num_rows, skip
        while held >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield emit(table.slice(0, batch_rows), batch_rows)
            rest = table.slice(batch_rows)
            at += batch_rows
            pending, held = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if held or invalid:
        table = pa.Table.from_batches(pending, schema=reader.schema)
        yield emit(table, held)


def _read_jsonl(unit: Unit, columns: Sequence[str], batch_rows: int, skip: int) -> Iterator[RawBatch]:
    with open(unit.file, "rb") as fh:
        row = 0
        cols: dict[str, list[Any]] = {c: [] for c in columns}
        bad: dict[int, str] = {}
        first = skip
        for line in fh:
            if not line.strip():
                continue  # blank lines are not rows
            if row < skip:
                row += 1
                continue
            k = row - first
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("the line is not a JSON object")
            except ValueError as exc:
                bad[k] = f"not a JSON object: {exc}"
                obj = {}
            for c in columns:
                cols[c].append(obj.get(c))
            row += 1
            if row - first == batch_rows:
                yield RawBatch(unit.file, first, batch_rows, cols, bad)
                first = row
                cols, bad = {c: [] for c in columns}, {}
        if row > first:
            yield RawBatch(unit.file, first, row - first, cols, bad)


def _read_npy(unit: Unit, batch_rows: int, skip: int) -> Iterator[RawBatch]:
    arr = _npy(unit.file)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    rows = unit.rows or 0
    for s in range(unit.start + skip, unit.start + rows, batch_rows):
        e = min(s + batch_rows, unit.start + rows)
        yield RawBatch(unit.file, s, e - s, {NPY_COLUMN: np.ascontiguousarray(arr[s:e])}, {})


def _read_images(unit: Unit, batch_rows: int, skip: int) -> Iterator[RawBatch]:
    members, root = unit.members, unit.root
    for s in range(skip, len(members), batch_rows):
        chunk = members[s:s + batch_rows]
        data: list[bytes] = []
        bad: dict[int, str] = {}
        for k, path in enumerate(chunk):
            try:
                with open(path, "rb") as fh:
                    data.append(fh.read())
            except OSError as exc:
                bad[k] = f"cannot read image {path}: {exc.strerror or exc}"
                data.append(b"")
        rel = [os.path.relpath(p, root) if root else p for p in chunk]
        yield RawBatch(unit.file, unit.start + s, len(chunk), {IMAGE_PATH: rel, IMAGE_BYTES: data}, bad,
                       files=list(chunk))
