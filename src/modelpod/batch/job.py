"""BatchJob: files -> Model -> files, in resumable parts, through the model code the server uses.

Rows are read unit by unit (``sources``), cut into parts of at most ``part_rows`` rows, converted
(``tensors``), predicted with ``ModelWorker.call`` (the server's call: the model's own failures become
``InferenceError``), written (``sinks``) and committed (``parts``). A batch the model fails on is
retried row by row, so only the rows that fail are quarantined, each with its file, row and reason.
With ``workers`` > 1 parts run on that many threads; parts may commit out of order, the output is
joined in input order at the end.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from modelpod.batch import sources, tensors
from modelpod.batch.parts import Part, PartStore, covered, unit_complete
from modelpod.batch.sinks import PART_EXTENSION, PartWriter, write_errors
from modelpod.batch.sources import RawBatch, Unit
from modelpod.batch.tensors import Binding
from modelpod.errors import BatchError, ModelpodError, TooManyErrorsError
from modelpod.model import Batch, Model
from modelpod.pod import DATATYPES
from modelpod.serving.worker import ModelWorker

Event = Callable[[dict[str, Any]], None]
PART_ROWS = 1 << 16
PART_BYTES = 64 << 20


@dataclass(frozen=True)
class BatchOptions:
    """How a job reads, maps, parts and writes (see ``modelpod batch --help``)."""

    format: str | None = None
    output_format: str | None = None
    columns: tuple[str, ...] | None = None
    input_map: Mapping[str, tuple[str, ...]] | None = None
    keep_columns: tuple[str, ...] | None = None
    batch_rows: int | None = None
    part_rows: int = PART_ROWS
    part_bytes: int = PART_BYTES
    workers: int = 1
    shard: tuple[int, int] | None = None  # (index, count), index from 0
    resume: bool = True
    overwrite: bool = False
    errors: Path | None = None
    max_errors: int | None = None
    cast: bool = False

    def __post_init__(self) -> None:
        if self.batch_rows is not None and self.batch_rows < 1:
            raise BatchError("--batch-rows must be at least 1")
        if self.workers < 1:
            raise BatchError("--workers must be at least 1")
        if self.part_rows < 1:
            raise BatchError("part_rows must be at least 1")
        if self.max_errors is not None and self.max_errors < 0:
            raise BatchError("--max-errors must be 0 or more")


@dataclass(frozen=True)
class BatchSummary:
    """What a run did. ``rows`` counts every input row of the job: ``rows_out`` + ``errors``."""

    output: str
    errors_path: str | None
    rows: int
    rows_out: int
    errors: int
    parts: int
    resumed_parts: int
    resumed_rows: int
    seconds: float  # the job itself: planning, scoring, joining (not the model's load)
    rows_per_s: float
    pod: str
    digest: str
    shard: str | None = None
    inputs: int = 0
    dropped_parts: tuple[str, ...] = field(default=())
    load_seconds: float = 0.0  # loading the model (and pyarrow's readers), before ``seconds`` starts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped_parts"] = list(self.dropped_parts)
        return d


@dataclass
class _Task:
    unit: Unit
    start: int  # offset within the unit
    end: int
    last: bool
    batches: list[RawBatch]


@dataclass
class Plan:
    """Everything decided before the first row: files, units, mapping, and the job's identity."""

    fmt: str
    units: list[Unit]  # this shard's
    bindings: list[Binding]
    keep: tuple[str, ...]
    columns: list[str]
    job: dict[str, Any]
    inputs: int

    @property
    def plan_digest(self) -> str:
        same = {k: v for k, v in self.job.items() if k != "shard"}
        return "sha256:" + hashlib.sha256(orjson.dumps(same, option=orjson.OPT_SORT_KEYS)).hexdigest()


BATCH_BYTES = 8 << 20  # input bytes per predict call the default batch size aims at
MIN_BATCH_ROWS, MAX_BATCH_ROWS = 1024, PART_ROWS


def default_batch_rows(model: Model, fmt: str) -> int:
    """Images and image-shaped inputs: the pod's ``max_batch_rows``. Rows of fixed width: the power
    of two at most ``BATCH_BYTES`` of input, within 1,024 rows … a part's rows (65,536): per-call
    costs (the model's own checks, conversions) are spread over many rows. The price: a batch the
    model fails on as a whole is retried row by row, so it costs that many single-row calls."""
    serving = model.pod.manifest.serving.max_batch_rows if model.pod is not None else 1
    if fmt == "images" or any(len(t.shape) > 2 for t in model.signature.inputs):
        return max(1, serving)
    row_bytes = 0
    for t in model.signature.inputs:
        width = int(np.prod(t.shape[1:], dtype=np.int64))
        dtype = DATATYPES.get(t.datatype)
        if width < 1 or dtype is None or dtype.kind in "OSU":
            return MIN_BATCH_ROWS  # free dims or text: their size is not known before reading
        row_bytes += width * dtype.itemsize
    rows = MIN_BATCH_ROWS
    while rows < MAX_BATCH_ROWS and rows * 2 * row_bytes <= BATCH_BYTES:
        rows *= 2
    return rows


def make_plan(model: Model, digest: str, ref: str, input: Any, out_fmt: str, opts: BatchOptions) -> Plan:
    fmt, paths = sources.find_inputs(input, opts.format)
    keep = opts.keep_columns if opts.keep_columns is not None else ((sources.IMAGE_PATH,) if fmt == "images" else ())
    available = sources.columns_of(fmt, paths[0])
    where = f"input {paths[0]}"
    bindings = tensors.bind(model.signature, available, fmt, columns=opts.columns, input_map=opts.input_map,
                            keep=keep, where=where)
    columns = tensors.needed_columns(bindings, keep)
    for path in paths:
        if fmt == "parquet":
            schema = sources.schema_of(fmt, path)
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise BatchError(f"input {path} has no column {', '.join(map(repr, missing))} "
                                 f"(columns: {', '.join(schema.names)}); every input file needs the same columns")
            tensors.check_schema(schema, bindings, opts.cast, f"input {path}")
        elif fmt == "npy":
            tensors.check_array(sources._npy(path), bindings[0], opts.cast, f"input {path}")
        elif fmt == "csv" and path != paths[0]:
            have = sources.columns_of(fmt, path) or []
            missing = [c for c in columns if c not in have]
            if missing:
                raise BatchError(f"input {path} has no column {', '.join(map(repr, missing))} "
                                 f"(columns: {', '.join(have)}); every input file needs the same columns")
    units = sources.plan_units(fmt, paths)
    if opts.shard is not None:
        from modelpod.batch.shards import share

        units = share(units, *opts.shard)
    job = {
        "pod": {"ref": ref, "digest": digest, "name": model.name},
        "inputs": [sources.fingerprint(p).to_dict() for p in paths],
        "format": fmt,
        "bindings": [b.to_dict() for b in bindings],
        "keep": list(keep),
        "output_format": out_fmt,
        "shard": list(opts.shard) if opts.shard else None,
        "cast": opts.cast,
    }
    return Plan(fmt, units, bindings, keep, columns, job, len(paths))


class Scorer:
    """Predicts through the server's ``ModelWorker.call``; a failed batch is retried row by row."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.worker = ModelWorker(model, model.name)

    def predict(self, inputs: Batch, rows: int) -> tuple[Batch, np.ndarray[Any, Any], dict[int, str]]:
        """Output records for the rows that succeed, the input row of each record (one per row, or
        one per detection of a detector), and the reason for each row that failed."""
        try:
            return (*self._call(inputs, rows), {})
        except BatchError:
            raise
        except ModelpodError as exc:
            if rows == 1:
                return {}, np.zeros(0, np.intp), {0: f"the model failed on this row: {exc}"}
        outs: list[Batch] = []
        index: list[np.ndarray[Any, Any]] = []
        failed: dict[int, str] = {}
        for j in range(rows):
            try:
                out, at = self._call({k: v[j:j + 1] for k, v in inputs.items()}, 1)
            except BatchError:
                raise
            except ModelpodError as exc:
                failed[j] = f"the model failed on this row: {exc}"
            else:
                outs.append(out)
                index.append(at + j)
        if not outs:
            return {}, np.zeros(0, np.intp), failed
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}, np.concatenate(index), failed

    def _call(self, inputs: Batch, rows: int) -> tuple[Batch, np.ndarray[Any, Any]]:
        out = self.worker.call(self.model.coerce(inputs))
        records = self.model.records(out, rows)  # a detector: one record per detection
        if records is not None:
            return records[0], np.asarray(records[1], dtype=np.intp)
        for k, v in out.items():
            if v.ndim == 0 or v.shape[0] != rows:
                raise BatchError(f"model {self.model.name}: output {k!r} has shape {list(v.shape)} for {rows} "
                                 "input rows; batch scoring needs one output row per input row")
        return out, np.arange(rows)


class BatchJob:
    """Runs one job's parts: reading, predicting, writing, committing, reporting."""

    def __init__(self, model: Model, plan: Plan, store: PartStore, out_fmt: str, opts: BatchOptions,
                 on_event: Event | None = None) -> None:
        self.model = model
        self.plan = plan
        self.store = store
        self.out_fmt = out_fmt
        self.opts = opts
        self.batch_rows = opts.batch_rows or default_batch_rows(model, plan.fmt)
        self.scorer = Scorer(model)
        # Table signatures take NaN for a missing number, as pandas reads one.
        self.missing_nan = bool(getattr(model.signature, "is_table", False))
        self.on_event = on_event or (lambda e: None)
        self.errors = sum(p.errors for p in store.parts)
        self.rows_done = sum(p.end - p.start for p in store.parts)
        self.started = time.monotonic()
        self.rows_run = 0
        known = [u.rows for u in plan.units]
        self.rows_total = sum(r for r in known if r is not None) if all(r is not None for r in known) else None

    # -- reading into part tasks -----------------------------------------------------------------
    def tasks(self) -> Iterator[_Task]:
        done = covered(self.store.parts)
        by_unit: dict[int, list[Part]] = {}
        for p in self.store.parts:
            by_unit.setdefault(p.unit, []).append(p)
        for unit in self.plan.units:
            mine = sorted(by_unit.get(unit.index, []), key=lambda p: p.start)
            if mine and unit_complete(mine):
                continue
            yield from self._unit_tasks(unit, done.get(unit.index, []))

    def _unit_tasks(self, unit: Unit, ranges: list[tuple[int, int]]) -> Iterator[_Task]:
        skip = ranges[0][1] if ranges and ranges[0][0] == 0 else 0
        holes = [r for r in ranges if r[1] > skip]
        cur: list[RawBatch] = []
        cur_start, cur_rows, cur_bytes = skip, 0, 0
        at = skip
        reader = sources.read_unit(self.plan.fmt, unit, self.plan.columns, self.batch_rows, skip)
        nxt = next(reader, None)
        while nxt is not None:
            raw, nxt = nxt, next(reader, None)
            pos = 0
            while pos < raw.rows or (raw.rows == 0 and pos == 0 and raw.notes):
                blocked = next((r for r in holes if r[0] <= at < r[1]), None)
                if blocked is not None:  # rows a committed part holds: step over them
                    if cur:
                        yield _Task(unit, cur_start, at, False, cur)
                        cur, cur_rows, cur_bytes = [], 0, 0
                    n = min(blocked[1] - at, raw.rows - pos)
                    pos, at = pos + n, at + n
                    cur_start = at
                    continue
                limit = next((r[0] for r in holes if r[0] > at), None)
                n = raw.rows - pos
                if limit is not None:
                    n = min(n, limit - at)
                n = min(n, self.opts.part_rows - cur_rows)
                piece = _slice(raw, pos, n)
                cur.append(piece)
                cur_rows += n
                cur_bytes += _size(piece)
                pos, at = pos + n, at + n
                if raw.rows == 0:
                    break
                if cur_rows >= self.opts.part_rows or cur_bytes >= self.opts.part_bytes:
                    final = nxt is None and pos >= raw.rows and not _starts_hole(holes, at)
                    yield _Task(unit, cur_start, at, final, cur)
                    cur, cur_rows, cur_bytes, cur_start = [], 0, 0, at
                    if final:
                        return
        if cur or not holes or holes[-1][1] != at:  # else a committed part already ends the unit
            yield _Task(unit, cur_start, at, True, cur)

    # -- one part ----------------------------------------------------------------------------------
    def run_task(self, task: _Task) -> Part:
        unit = task.unit
        name = f"part-{unit.index:06d}-{task.start:010d}"
        writer = PartWriter(self.store.directory, f"{name}.{PART_EXTENSION[self.out_fmt]}", self.out_fmt)
        try:
            return self._run_task(task, name, writer)
        except BaseException:
            writer.abort()
            raise

    def _run_task(self, task: _Task, name: str, writer: PartWriter) -> Part:
        unit = task.unit
        errors: list[dict[str, Any]] = []
        for raw in task.batches:
            errors.extend(raw.notes and [{"file": raw.file, **n} for n in raw.notes])
            if raw.rows == 0:
                continue
            conv = tensors.convert(raw, self.plan.fmt, self.plan.bindings, self.opts.cast, self.missing_nan)
            good = conv.good
            bad = dict(conv.bad)
            if len(good):
                outputs, at, failed = self.scorer.predict(conv.inputs, len(good))
                for j, reason in failed.items():
                    bad[int(good[j])] = reason
                if len(at):
                    cols = {**tensors.kept_arrays(raw, self.plan.keep, good[at]), **tensors.output_arrays(outputs)}
                    writer.write(sources.pyarrow().table(cols))
            for k in sorted(bad):
                rec: dict[str, Any] = {"file": raw.files[k] if raw.files else raw.file, "row": raw.start + k,
                                       "reason": bad[k]}
                values = tensors.row_values(raw, k, self.plan.columns)
                if values:
                    rec["values"] = values
                errors.append(rec)
        file, digest, size = writer.close()
        efile, edigest, esize = write_errors(self.store.directory, f"{name}.errors.jsonl", errors)
        part = Part(unit.index, task.start, task.end, task.last, writer.rows, len(errors), file, digest, size,
                    efile, edigest, esize, writer.columns)
        self.store.commit(part)
        return part

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        self.on_event({"event": "start", "rows_total": self.rows_total, "rows_done": self.rows_done,
                       "parts_done": len(self.store.parts), "units": len(self.plan.units),
                       "batch_rows": self.batch_rows, "workers": self.opts.workers})
        if self.opts.workers == 1:
            for task in self.tasks():
                self._committed(self.run_task(task))
            return
        with ThreadPoolExecutor(self.opts.workers, thread_name_prefix="modelpod-batch") as pool:
            pending: set[Future[Part]] = set()
            try:
                for task in self.tasks():
                    pending.add(pool.submit(self.run_task, task))
                    while len(pending) > self.opts.workers:
                        pending = self._reap(pending)
                while pending:
                    pending = self._reap(pending)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise

    def _reap(self, pending: set[Future[Part]]) -> set[Future[Part]]:
        done, rest = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            self._committed(f.result())
        return set(rest)

    def _committed(self, part: Part) -> None:
        rows = part.end - part.start
        self.rows_done += rows
        self.rows_run += rows
        self.errors += part.errors
        elapsed = time.monotonic() - self.started
        rate = self.rows_run / elapsed if elapsed > 0 else 0.0
        left = (self.rows_total - self.rows_done) if self.rows_total is not None else None
        self.on_event({"event": "part", "unit": part.unit, "start": part.start, "rows": rows,
                       "rows_out": part.rows_out, "errors": part.errors, "rows_done": self.rows_done,
                       "rows_total": self.rows_total, "errors_total": self.errors, "rows_per_s": round(rate, 1),
                       "elapsed_s": round(elapsed, 3),
                       "eta_s": round(left / rate, 1) if left is not None and rate > 0 else None})
        if self.opts.max_errors is not None and self.errors > self.opts.max_errors:
            raise TooManyErrorsError(
                f"{self.errors} bad rows, more than --max-errors {self.opts.max_errors}; their rows and reasons are "
                f"in {self.store.directory}/*.errors.jsonl. Fix the input and rerun with --overwrite, or raise "
                "--max-errors and rerun the same command to carry on")


def _starts_hole(holes: Sequence[tuple[int, int]], at: int) -> bool:
    return any(r[0] == at for r in holes)


def _slice(raw: RawBatch, pos: int, n: int) -> RawBatch:
    if pos == 0 and n == raw.rows:
        return raw
    cols: dict[str, Any] = {}
    for k, v in raw.columns.items():
        cols[k] = v[pos:pos + n] if isinstance(v, (list, np.ndarray)) else v.slice(pos, n)
    bad = {k - pos: r for k, r in raw.bad.items() if pos <= k < pos + n}
    files = raw.files[pos:pos + n] if raw.files else None
    return RawBatch(raw.file, raw.start + pos, n, cols, bad, files, raw.notes if pos == 0 else [])


def _size(raw: RawBatch) -> int:
    total = 0
    for v in raw.columns.values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, list):
            total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in v)
        else:
            total += int(v.nbytes)
    return total
