"""``modelpod.batch.run``: score files with a pod, resumably; the Python API behind ``modelpod batch``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelpod.batch.job import BatchJob, BatchOptions, BatchSummary, Event, make_plan
from modelpod.batch.parts import Part, PartStore, unit_complete
from modelpod.batch.shards import default_errors_path, shard_dir, shard_name, write_record
from modelpod.batch.sinks import EXTENSION, assemble, disk_full, join_errors, output_format
from modelpod.batch.sources import import_readers
from modelpod.errors import BatchError
from modelpod.model import Model
from modelpod.settings import Settings
from modelpod.store import Store


def load_model(ref: str | Path, store: Store | None = None, settings: Settings | None = None) -> tuple[Model, str]:
    """The pod's Model, loaded, and its digest (the same adapters the server loads)."""
    from modelpod.api import open_pod
    from modelpod.trust.gate import load_model as admitted

    pod = open_pod(ref, store=store, settings=settings)
    model = admitted(pod, settings or Settings.from_env(), what=f"pod {ref}")
    if not model.loaded:
        model.load()
    return model, pod.digest


def options(**kwargs: Any) -> BatchOptions:
    """BatchOptions from keyword arguments as a caller writes them (lists, strings, paths)."""
    if kwargs.get("columns") is not None:
        kwargs["columns"] = tuple(_names(kwargs["columns"]))
    if kwargs.get("keep_columns") is not None:
        kwargs["keep_columns"] = tuple(_names(kwargs["keep_columns"]))
    if kwargs.get("input_map") is not None:
        kwargs["input_map"] = {k: tuple(_names(v)) for k, v in dict(kwargs["input_map"]).items()}
    if kwargs.get("errors") is not None:
        kwargs["errors"] = Path(kwargs["errors"])
    if isinstance(kwargs.get("shard"), str):
        from modelpod.batch.shards import parse_shard

        kwargs["shard"] = parse_shard(kwargs["shard"])
    try:
        return BatchOptions(**kwargs)
    except TypeError as exc:
        raise BatchError(f"batch options: {exc}") from None


def _names(value: str | Sequence[str]) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else list(value)


def run(ref: str | Path, input: str | Path | Sequence[str | Path], output: str | Path, *,
        store: Store | None = None, settings: Settings | None = None, model: Model | None = None,
        digest: str | None = None, on_event: Event | None = None, **kwargs: Any) -> BatchSummary:
    """Score ``input`` (a file, directory or glob) with pod ``ref`` into ``output``; a summary of the run.

    Keyword options are ``BatchOptions``' fields: ``format``, ``output_format``, ``columns``,
    ``input_map``, ``keep_columns``, ``batch_rows``, ``workers``, ``shard`` ("I/N" or a tuple),
    ``resume``, ``overwrite``, ``errors``, ``max_errors``, ``cast``, ``part_rows``.
    """
    opts = options(**kwargs)
    final = Path(output).expanduser().absolute()
    out_fmt = output_format(final, opts.output_format)
    if opts.shard is not None:
        where = shard_dir(final)
        name = shard_name(*opts.shard)
        target, errors_path = where / f"{name}.{EXTENSION[out_fmt]}", where / f"{name}.errors.jsonl"
        parts_dir = where / f"{name}.parts"
    else:
        target = final
        errors_path = (opts.errors.expanduser().absolute() if opts.errors else default_errors_path(final))
        parts_dir = final.with_name(final.name + ".parts")
    if not final.parent.is_dir():
        raise BatchError(f"--output {final}: the directory {final.parent} does not exist; create it first")
    if target.exists() and not opts.overwrite:
        raise BatchError(f"{target} exists; pass --overwrite to replace it, or choose another --output")
    t_load = time.monotonic()
    if model is None:
        model, digest = load_model(ref, store, settings)
    import_readers()
    t0 = time.monotonic()
    plan = make_plan(model, digest or "", str(ref), input, out_fmt, opts)
    parts = PartStore(parts_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if opts.overwrite:
            parts.remove()
        elif parts_dir.exists() and not opts.resume:
            raise BatchError(f"an unfinished run of this job is in {parts_dir}; rerun with --resume to carry on, "
                             "or --overwrite to start again")
        before = parts.open(plan.job)
    except OSError as exc:
        raise disk_full(parts_dir, exc) from None
    runner = BatchJob(model, plan, parts, out_fmt, opts, on_event)
    runner.run()
    ordered = _complete(plan.units, parts.parts, parts_dir)
    rows = sum(p.end - p.start for p in ordered)
    rows_out = sum(p.rows_out for p in ordered)
    errors = sum(p.errors for p in ordered)
    error_files = [parts_dir / p.errors_file for p in ordered if p.errors_file]
    empty_columns = [*plan.keep, *(t.name for t in model.signature.outputs)]
    if error_files:
        join_errors(error_files, errors_path)
    elif errors_path.exists() and opts.overwrite and opts.shard is None:
        errors_path.unlink()
    assemble([(parts_dir, p) for p in ordered], target, out_fmt, empty_columns)
    if opts.shard is not None:
        from modelpod.batch.parts import sha256_of

        columns = next((list(p.columns) for p in ordered if p.file), empty_columns)
        write_record(target.parent, *opts.shard, {
            "plan": plan.plan_digest, "pod": plan.job["pod"], "output_format": out_fmt, "rows": rows,
            "rows_out": rows_out, "errors": errors, "file": target.name, "sha256": sha256_of(target),
            "size": target.stat().st_size, "columns": columns,
            "errors_file": errors_path.name if error_files else None,
            "errors_sha256": sha256_of(errors_path) if error_files else "",
            "errors_size": errors_path.stat().st_size if error_files else 0,
            "units": [u.index for u in plan.units[:1]] + [u.index for u in plan.units[-1:]],
        })
    parts.remove()
    seconds = time.monotonic() - t0
    return BatchSummary(
        output=str(target), errors_path=str(errors_path) if error_files else None, rows=rows, rows_out=rows_out,
        errors=errors, parts=len(ordered), resumed_parts=len(before), resumed_rows=sum(p.end - p.start for p in before),
        seconds=round(seconds, 3), rows_per_s=round(runner.rows_run / seconds, 1) if seconds > 0 else 0.0,
        pod=str(ref), digest=digest or "", shard=f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else None,
        inputs=plan.inputs, dropped_parts=tuple(parts.dropped), load_seconds=round(t0 - t_load, 3))


def _complete(units: Sequence[Any], parts: Sequence[Part], directory: Path) -> list[Part]:
    """Every unit's parts in order; a BatchError when one is not covered (nothing is joined then)."""
    by_unit: dict[int, list[Part]] = {}
    for p in parts:
        by_unit.setdefault(p.unit, []).append(p)
    ordered: list[Part] = []
    for u in units:
        mine = sorted(by_unit.get(u.index, []), key=lambda p: p.start)
        if not unit_complete(mine):
            raise BatchError(f"{directory}: the rows of {u.file} are not all committed; rerun the same command "
                             "to finish them")
        ordered += [p for p in mine if p.start < p.end or p.last]
    return ordered

