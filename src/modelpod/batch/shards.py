"""Shards: a deterministic share of the input per machine, and the merge of the shards' outputs.

Shard I of N takes a contiguous run of units (whole files, Parquet row groups, slices of ``.npy``
files or image folders), chosen by their bytes so shards get about the same amount of input. The
same input gives every machine the same split, so N machines running ``--shard I/N`` (or a
Kubernetes Indexed Job, which sets ``JOB_COMPLETION_INDEX``) cover every unit exactly once; joining
the shards in shard order gives the input order. A finished shard writes its output and a record
(``OUTPUT.shards/IIIII-of-NNNNN.json``: its plan, rows, checksums); ``merge`` checks every shard of
the same plan is there and whole, then joins them under the final name.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from modelpod.batch.parts import Part, sha256_of, write_json
from modelpod.batch.sinks import EXTENSION, assemble, join_errors, output_format
from modelpod.batch.sources import Unit
from modelpod.errors import BatchError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | None, index: str | None = None, count: int | None = None) -> tuple[int, int] | None:
    """``I/N`` (I from 0), or ``JOB_COMPLETION_INDEX`` with ``--shards N``; None when neither is given."""
    if text:
        m = _SPEC.match(text)
        if not m:
            raise BatchError(f"--shard {text!r}: use I/N, e.g. 0/4 for the first of four shards")
        i, n = int(m.group(1)), int(m.group(2))
    elif count is not None:
        if index is None or not index.strip().isdigit():
            raise BatchError("--shards N needs JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job) or --shard I/N")
        i, n = int(index), count
    else:
        return None
    if n < 1 or not 0 <= i < n:
        raise BatchError(f"shard {i}/{n}: the index runs from 0 to {n - 1}")
    return i, n


def share(units: Sequence[Unit], index: int, count: int) -> list[Unit]:
    """Shard ``index``'s contiguous run of units: each unit goes to the shard its byte midpoint falls in."""
    total = sum(u.weight for u in units) or 1
    acc = 0
    mine = []
    for u in units:
        owner = min(count - 1, (2 * acc + u.weight) * count // (2 * total))
        acc += u.weight
        if owner == index:
            mine.append(u)
    return mine


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def shard_name(index: int, count: int) -> str:
    return f"{index:05d}-of-{count:05d}"


def write_record(directory: Path, index: int, count: int, data: dict[str, Any]) -> Path:
    path = directory / f"{shard_name(index, count)}.json"
    write_json(path, {"shard": index, "shards": count, **data})
    return path


@dataclass(frozen=True)
class MergeSummary:
    output: str
    errors_path: str | None
    shards: int
    rows: int
    rows_out: int
    errors: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def merge(output: str | Path, *, errors: str | Path | None = None, overwrite: bool = False,
          keep_shards: bool = False, output_fmt: str | None = None) -> MergeSummary:
    """Join ``OUTPUT.shards/`` into ``OUTPUT`` once every shard is there and whole."""
    final = Path(output).absolute()
    fmt = output_format(final, output_fmt)
    directory = shard_dir(final)
    if final.exists() and not overwrite:
        raise BatchError(f"{final} exists; pass --overwrite to replace it, or choose another --output")
    records = []
    for path in sorted(directory.glob("*-of-*.json")) if directory.is_dir() else []:
        try:
            records.append(orjson.loads(path.read_bytes()))
        except orjson.JSONDecodeError:
            raise BatchError(f"{path} is damaged; run that shard again") from None
    if not records:
        raise BatchError(f"no finished shards in {directory}; run `modelpod batch ... --output {final} --shard I/N` "
                         "for every shard first")
    counts = {r["shards"] for r in records}
    plans = {r["plan"] for r in records}
    if len(counts) > 1 or len(plans) > 1:
        raise BatchError(f"{directory} holds shards of different jobs (shard counts {sorted(counts)}, "
                         f"{len(plans)} plans); delete the stale ones and run them again")
    count = counts.pop()
    have = {r["shard"]: r for r in records}
    missing = [i for i in range(count) if i not in have]
    if missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:10])
        raise BatchError(f"{len(missing)} of {count} shards are not finished ({shown}); run them "
                         f"(--shard I/N or the Indexed Job's failed indexes), then merge again")
    parts: list[tuple[Path, Part]] = []
    error_files: list[Path] = []
    for i in range(count):
        rec = have[i]
        if rec["output_format"] != fmt:
            raise BatchError(f"shard {i}/{count} wrote {rec['output_format']}, not {fmt}; merge into a "
                             f"{EXTENSION[rec['output_format']]} file")
        for key, sha_key, size_key in (("file", "sha256", "size"), ("errors_file", "errors_sha256", "errors_size")):
            name = rec.get(key)
            if not name:
                continue
            path = directory / name
            if not path.is_file() or path.stat().st_size != rec[size_key] or sha256_of(path) != rec[sha_key]:
                raise BatchError(f"{path} does not match its shard record (missing or changed); run shard "
                                 f"{i}/{count} again with --overwrite")
            if key == "errors_file":
                error_files.append(path)
        if rec.get("file"):
            parts.append((directory, Part(0, 0, 0, True, rec["rows_out"], 0, rec["file"], rec["sha256"],
                                          rec["size"], columns=tuple(rec.get("columns") or ()))))
    errors_path = Path(errors).absolute() if errors else default_errors_path(final)
    total_errors = sum(int(have[i]["errors"]) for i in range(count))
    if error_files:
        join_errors(error_files, errors_path)
    assemble(parts, final, fmt, have[0].get("columns") or (), headed=True)
    if not keep_shards:
        shutil.rmtree(directory, ignore_errors=True)
    return MergeSummary(str(final), str(errors_path) if error_files else None, count,
                        sum(int(have[i]["rows"]) for i in range(count)),
                        sum(int(have[i]["rows_out"]) for i in range(count)), total_errors)


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")
