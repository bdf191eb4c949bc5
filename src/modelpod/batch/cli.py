"""``modelpod batch`` and ``modelpod batch merge``: the edge that reads the environment and shows progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from modelpod.errors import BatchError
from modelpod.settings import Settings


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The flags of ``modelpod batch`` (cli.py registers the command)."""
    c.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION, NAME@ALIAS or a pod directory; "
                   "`merge` joins finished shards")
    c.add_argument("--input", nargs="+", metavar="PATH_OR_GLOB", help="file(s), directory or glob")
    c.add_argument("--output", metavar="PATH", help="output file: .parquet, .csv or .jsonl")
    c.add_argument("--format", choices=("csv", "parquet", "jsonl", "npy", "images"), help="input format")
    c.add_argument("--output-format", choices=("parquet", "csv", "jsonl"))
    c.add_argument("--columns", metavar="A,B,C", help="columns that make the (single) input, in order")
    c.add_argument("--input-map", action="append", metavar="INPUT=A,B,C", help="columns of one input (repeatable)")
    c.add_argument("--keep-columns", metavar="ID,...", help="input columns written next to the outputs")
    c.add_argument("--batch-rows", type=int, metavar="N", help="rows per predict call")
    c.add_argument("--part-rows", type=int, metavar="N", help="rows per committed part (default 65536)")
    c.add_argument("--workers", type=int, default=1, metavar="N", help="parts predicted at once (threads)")
    c.add_argument("--shard", metavar="I/N", help="take shard I (from 0) of N")
    c.add_argument("--shards", type=int, metavar="N", help="N shards, I from $JOB_COMPLETION_INDEX")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run (also the default)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output, start again")
    c.add_argument("--errors", metavar="PATH", help="bad rows as JSON Lines (default OUTPUT.errors.jsonl)")
    c.add_argument("--max-errors", type=int, metavar="N", help="fail (exit 1) past N bad rows")
    c.add_argument("--cast", action="store_true", help="allow safe casts of typed columns (double -> FP32)")
    c.add_argument("--keep-shards", action="store_true", help="merge: leave OUTPUT.shards/ in place")


def _input_map(items: list[str] | None) -> dict[str, list[str]] | None:
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, cols = item.partition("=")
        if not sep or not name or not cols:
            raise BatchError(f"--input-map {item!r}: use INPUT=COL,COL,...")
        out[name] = [c for c in cols.split(",") if c]
    return out


def batch_command(args: argparse.Namespace, settings: Settings, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    if not args.output:
        raise BatchError("--output is required: the file to write (.parquet, .csv or .jsonl)")
    if args.ref == "merge":
        from modelpod.batch.shards import merge

        merged = merge(args.output, errors=args.errors, overwrite=args.overwrite, keep_shards=args.keep_shards,
                       output_fmt=args.output_format)
        _print(args, merged.to_dict(), f"merged {merged.shards} shards into {merged.output}: {merged.rows_out} rows"
               + (f", {merged.errors} bad rows in {merged.errors_path}" if merged.errors else ""))
        return 0
    if not args.input:
        raise BatchError("--input is required: a file, a directory or a glob")
    from modelpod.batch.api import run
    from modelpod.batch.shards import parse_shard

    shard = parse_shard(args.shard, env.get("JOB_COMPLETION_INDEX"), args.shards)
    kwargs: dict[str, Any] = {
        "format": args.format, "output_format": args.output_format, "columns": args.columns,
        "input_map": _input_map(args.input_map), "keep_columns": args.keep_columns, "batch_rows": args.batch_rows,
        "workers": args.workers, "shard": shard, "resume": True, "overwrite": args.overwrite, "errors": args.errors,
        "max_errors": args.max_errors, "cast": args.cast,
    }
    if args.part_rows:
        kwargs["part_rows"] = args.part_rows
    with _progress(args) as on_event:
        summary = run(args.ref, args.input if len(args.input) > 1 else args.input[0], args.output,
                      settings=settings, on_event=on_event, **kwargs)
    text = (f"wrote {summary.rows_out} rows to {summary.output} in {summary.seconds:.1f}s "
            f"({summary.rows_per_s:,.0f} rows/s)")
    if summary.resumed_rows:
        text += f"; resumed after {summary.resumed_rows} committed rows"
    if summary.errors:
        text += f"; {summary.errors} bad rows in {summary.errors_path}"
    _print(args, summary.to_dict(), text)
    return 0


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(text)


@contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich bar on a terminal; else (or with --json) one JSON status line per part on stderr."""
    if args.json or not sys.stderr.isatty():
        yield _json_lines
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # rich is not in every image
        yield _json_lines
        return
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
               TextColumn("{task.fields[rate]} rows/s"), TextColumn("{task.fields[errors]} bad"),
               TimeRemainingColumn())
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("batch", total=None, rate="-", errors=0)

        def show(event: dict[str, Any]) -> None:
            bar.update(task, total=event.get("rows_total"), completed=event.get("rows_done", 0),
                       rate=f"{event.get('rows_per_s', 0):,.0f}" if "rows_per_s" in event else "-",
                       errors=event.get("errors_total", 0))

        yield show


def _json_lines(event: dict[str, Any]) -> None:
    print(json.dumps(event, sort_keys=True), file=sys.stderr, flush=True)
