"""Writing outputs: one file per part, then the parts joined, in input order, under the final name.

Parquet parts are Parquet files of one row group each (a part's tables are held until it closes:
at most ``part_rows`` rows of outputs and kept columns), joined at the file level (``footer``):
their bytes are copied and one footer lists their row groups, so no value is decoded or encoded
twice. Parts whose schemas differ are re-written instead (one part in memory at a time). CSV parts
are CSV without a header and JSON Lines parts are lines, joined by copying bytes. The joined file is
written under a temporary name in the output's directory and renamed when whole, so the final name
only ever holds a complete output. CSV cannot hold lists: a tensor output of shape [rows, k] becomes
the columns NAME_0 … NAME_k-1 there.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from modelpod.batch import footer
from modelpod.batch.parts import Part, publish
from modelpod.batch.sources import pyarrow
from modelpod.errors import BatchError

OUTPUT_FORMATS = ("parquet", "csv", "jsonl")
_OUT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".json": "jsonl"}
EXTENSION = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}
PART_EXTENSION = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def output_format(output: Path, given: str | None) -> str:
    if given:
        if given not in OUTPUT_FORMATS:
            raise BatchError(f"--output-format {given!r}: use one of {', '.join(OUTPUT_FORMATS)}")
        return given
    found = _OUT_SUFFIXES.get(output.suffix.lower())
    if found is None:
        raise BatchError(f"--output {output}: cannot tell the format from the name; end it in .parquet, .csv or "
                         ".jsonl, or pass --output-format")
    return found


def disk_full(path: Path, exc: OSError) -> BatchError:
    if exc.errno == errno.ENOSPC:
        return BatchError(f"no space left on the device writing {path}; free some space (or point --output at a "
                          "bigger disk) and rerun the same command: it resumes from the last committed part")
    return BatchError(f"cannot write {path}: {exc.strerror or exc}; check the directory exists and is writable")


def _flatten_lists(table: Any) -> Any:
    pa = pyarrow()
    names, arrays = [], []
    for name, col in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_fixed_size_list(col.type):
            flat = col.combine_chunks()
            size = col.type.list_size
            values = flat.flatten()
            while pa.types.is_fixed_size_list(values.type):
                size *= values.type.list_size
                values = values.flatten()
            import pyarrow.compute as pc

            idx = pa.array(range(0, len(values), size)) if size else pa.array([], pa.int64())
            for j in range(size):
                names.append(f"{name}_{j}")
                arrays.append(pc.take(values, pc.add(idx, j)) if len(values) else pa.array([], values.type))
        elif pa.types.is_nested(col.type):  # variable lists, structs, maps: their JSON text
            names.append(name)
            arrays.append(pa.array([None if v is None else orjson.dumps(v, default=_json_default).decode()
                                    for v in col.to_pylist()], pa.string()))
        else:
            names.append(name)
            arrays.append(col)
    return pa.table(dict(zip(names, arrays, strict=True)))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError


class PartWriter:
    """Writes one part's tables to a temporary file; ``close`` publishes it and returns its record."""

    def __init__(self, directory: Path, name: str, fmt: str) -> None:
        self.final = directory / name
        self.tmp = directory / f".{name}.tmp"
        self.fmt = fmt
        self.rows = 0
        self.columns: tuple[str, ...] = ()
        self._writer: Any = None
        self._fh: Any = None
        self._schema: Any = None
        self._tables: list[Any] = []

    def write(self, table: Any) -> None:
        if table.num_rows == 0:
            return
        pa = pyarrow()
        try:
            if self.fmt == "parquet":  # held until close: the part is one row group
                if self._schema is None:
                    self._schema = table.schema
                    self.columns = tuple(table.column_names)
                elif table.schema != self._schema:
                    table = table.cast(self._schema)
                self._tables.append(table)
            elif self.fmt == "csv":
                import pyarrow.csv as pcsv

                flat = _flatten_lists(table)
                if self._writer is None:
                    self.columns = tuple(flat.column_names)
                    self._schema = flat.schema
                    self._writer = pcsv.CSVWriter(self.tmp, flat.schema,
                                                  write_options=pcsv.WriteOptions(include_header=False))
                elif flat.schema != self._schema:
                    flat = flat.cast(self._schema)
                self._writer.write_table(flat)
            else:
                if self._fh is None:
                    self.columns = tuple(table.column_names)
                    self._fh = self.tmp.open("wb")
                self._fh.write(b"".join(orjson.dumps(row, default=_json_default,
                                                     option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
                                        for row in table.to_pylist()))
        except OSError as exc:
            raise disk_full(self.tmp, exc) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise BatchError(f"the outputs change type between batches ({exc}); check the kept columns' types"
                             ) from None
        self.rows += table.num_rows

    def abort(self) -> None:
        """Drop a part that failed half-way (its rows are done again)."""
        for handle in (self._writer, self._fh):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        self._writer = self._fh = None
        self._tables = []
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def close(self) -> tuple[str | None, str, int]:
        """(file name or None when empty, sha256, size)."""
        try:
            if self._tables:
                import pyarrow.parquet as pq

                tables, self._tables = self._tables, []
                table = tables[0] if len(tables) == 1 else pyarrow().concat_tables(tables)
                pq.write_table(table, self.tmp, row_group_size=max(1, table.num_rows))
            writer, fh, self._writer, self._fh = self._writer, self._fh, None, None
            if writer is not None:
                writer.close()
            if fh is not None:
                fh.close()
            if self.rows == 0:
                self.tmp.unlink(missing_ok=True)
                return None, "", 0
            digest, size = publish(self.tmp, self.final, sync=False)
        except OSError as exc:
            raise disk_full(self.tmp, exc) from None
        return self.final.name, digest, size


def write_errors(directory: Path, name: str, records: Sequence[dict[str, Any]]) -> tuple[str | None, str, int]:
    if not records:
        return None, "", 0
    tmp = directory / f".{name}.tmp"
    try:
        tmp.write_bytes(b"".join(orjson.dumps(r, default=_json_default) + b"\n" for r in records))
        digest, size = publish(tmp, directory / name, sync=False)
    except OSError as exc:
        raise disk_full(tmp, exc) from None
    return name, digest, size


def temp_beside(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def assemble(parts: Sequence[tuple[Path, Part]], final: Path, fmt: str,
             empty_columns: Sequence[str] = (), headed: bool = False) -> int:
    """Join part files (already in input order) into ``final`` atomically; the number of bytes written.

    ``headed``: the CSV files start with their own header (finished shards), which is left out."""
    tmp = temp_beside(final)
    try:
        files = [(d / p.file, p) for d, p in parts if p.file]
        if fmt == "parquet":
            _join_parquet([f for f, _ in files], tmp, empty_columns)
        else:
            with tmp.open("wb") as out:
                if fmt == "csv":
                    header = next((p.columns for _, p in files), tuple(empty_columns))
                    if header:
                        out.write(_csv_header(header))
                for path, part in files:
                    with path.open("rb") as src:
                        if headed and fmt == "csv":
                            own = _csv_header(part.columns)
                            if src.read(len(own)) != own:
                                raise BatchError(f"{path} does not start with the header {own.decode().strip()}")
                        shutil.copyfileobj(src, out, 1 << 20)
        _, size = publish(tmp, final, digest=False)
        return size
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_full(final, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _csv_header(columns: Sequence[str]) -> bytes:
    pa = pyarrow()
    import io

    import pyarrow.csv as pcsv

    buf = io.BytesIO()
    pcsv.write_csv(pa.table({c: pa.array([], pa.string()) for c in columns}), buf)
    return buf.getvalue()


def _join_parquet(files: Sequence[Path], tmp: Path, empty_columns: Sequence[str]) -> None:
    pa = pyarrow()
    import pyarrow.parquet as pq

    if not files:
        pq.write_table(pa.table({c: pa.array([], pa.null()) for c in empty_columns}), tmp)
        return
    try:
        with tmp.open("wb") as out:
            if footer.join(files, out):
                return
    except footer.FooterError as exc:
        raise BatchError(f"cannot join the parts: {exc}; rerun with --overwrite") from None
    schemas = [pq.read_schema(f) for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    with pq.ParquetWriter(tmp, schema) as writer:
        for f in files:
            table = pq.read_table(f)
            if table.schema != schema:
                table = table.cast(schema)
            writer.write_table(table, row_group_size=1 << 20)


def join_errors(sources: Sequence[Path], final: Path) -> int:
    """Errors files concatenated into ``final`` (atomically); lines written."""
    tmp = temp_beside(final)
    lines = 0
    try:
        with tmp.open("wb") as out:
            for src in sources:
                data = src.read_bytes()
                lines += data.count(b"\n")
                out.write(data)
        publish(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_full(final, exc) from None
    return lines


