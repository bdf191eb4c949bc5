"""Resumable parts: a job's directory of committed parts and the journal that says which are done.

``OUTPUT.parts/`` holds ``job.json`` (what the job reads, with which pod, mapped how), the part files
and ``journal.jsonl``. A part is committed in this order: its file is written under a temporary
name and renamed, and only then its line (rows, size, checksum) is appended to the journal, which is
synced about once a second (``PartStore.commit``; a part's file is never synced: see ``publish``).
A crash at any point leaves a journal line whose file is whole, a line whose file a power cut lost
or cut short (its size or checksum tells), or no line: on resume a torn or garbled line is cut off,
files without a line are deleted, every listed file is re-hashed (a damaged one is dropped and its
rows done again), and the job carries on with the rows no committed part covers. So every input row
lands in exactly one committed part.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from modelpod.errors import BatchError

JOB_FILE = "job.json"
JOURNAL = "journal.jsonl"
SYNC_EVERY_S = 1.0  # the journal is synced at most this often (see ``PartStore.commit``)
FORMAT = 1
# What must be the same for a resumed job to continue the first one (the rest may change).
_SAME = ("pod", "inputs", "format", "bindings", "keep", "output_format", "shard", "cast")


@dataclass(frozen=True)
class Part:
    """Rows [start, end) of a unit (offsets within the unit), written to ``file`` with its outputs."""

    unit: int
    start: int
    end: int
    last: bool  # the unit's rows end here
    rows_out: int
    errors: int
    file: str | None = None
    sha256: str = ""
    size: int = 0
    errors_file: str | None = None
    errors_sha256: str = ""
    errors_size: int = 0
    columns: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = list(self.columns)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Part:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["columns"] = tuple(known.get("columns") or ())
        return cls(**known)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, digest: bool = True, sync: bool = True) -> tuple[str, int]:
    """Sync ``tmp``, rename it to ``final`` atomically, sync the directory; (sha256 or "", size) of the file.

    ``sync=False`` (a part): the rename only. A part need not be on disk before its journal line is,
    since resuming checks every listed part's size and checksum: one a power cut lost is done again."""
    if sync:
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
    sha, size = (sha256_of(tmp) if digest else ""), tmp.stat().st_size
    os.replace(tmp, final)
    if sync:
        fsync_dir(final.parent)
    return sha, size


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    publish(tmp, path)


class PartStore:
    """The parts directory of one job (one shard of it when sharded)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self.parts: list[Part] = []
        self.dropped: list[str] = []  # damaged parts found on resume (their rows are done again)
        self._synced = time.monotonic()  # the journal's last sync (its creation counts as one)

    def path(self, name: str) -> Path:
        return self.directory / name

    def open(self, job: Mapping[str, Any]) -> list[Part]:
        """Start the job, or resume it when this directory holds the same job; the committed parts."""
        jfile = self.directory / JOB_FILE
        if jfile.is_file():
            try:
                before = orjson.loads(jfile.read_bytes())
            except orjson.JSONDecodeError:
                raise BatchError(f"{jfile} is damaged; delete {self.directory} (or pass --overwrite) to start "
                                 "again") from None
            _same_job(before, job, self.directory)
            self.parts = self._read_journal()
        else:
            if self.directory.exists():
                shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            write_json(jfile, {"batch_format": FORMAT, **job})
            (self.directory / JOURNAL).touch()
            fsync_dir(self.directory)
            self.parts = []
        return list(self.parts)

    def _read_journal(self) -> list[Part]:
        journal = self.directory / JOURNAL
        raw = journal.read_bytes() if journal.is_file() else b""
        lines = raw.split(b"\n")
        whole = lines[:-1]  # the text after the last newline is a torn write
        parts: list[Part] = []
        kept: list[bytes] = []
        for line in whole:
            try:
                part = Part.from_dict(orjson.loads(line))
            except (orjson.JSONDecodeError, TypeError):
                continue
            if self._intact(part):
                parts.append(part)
                kept.append(line)
            else:
                self.dropped.append(part.file or "")
        if lines[-1] or len(kept) != len(whole):
            tmp = journal.with_name(f".{JOURNAL}.tmp")
            tmp.write_bytes(b"".join(k + b"\n" for k in kept))
            publish(tmp, journal)
        listed = {p.file for p in parts} | {p.errors_file for p in parts} | {JOB_FILE, JOURNAL}
        for child in self.directory.iterdir():
            if child.name not in listed:
                child.unlink()  # written before a crash, never committed
        _check_disjoint(parts, self.directory)
        return parts

    def _intact(self, part: Part) -> bool:
        for name, digest, size in ((part.file, part.sha256, part.size),
                                   (part.errors_file, part.errors_sha256, part.errors_size)):
            if name is None:
                continue
            path = self.directory / name
            if not path.is_file() or path.stat().st_size != size or sha256_of(path) != digest:
                return False
        return True

    def commit(self, part: Part) -> None:
        """Append the part's line. The write alone survives a kill -9 (the kernel holds it); it is
        synced against a power cut when ``SYNC_EVERY_S`` has passed since the last sync (a group
        commit: a power cut loses at most that much work, whose files are then deleted and redone)."""
        line = orjson.dumps(part.to_dict()) + b"\n"
        with self._lock:
            with (self.directory / JOURNAL).open("ab") as fh:
                fh.write(line)
                fh.flush()
                now = time.monotonic()
                if now - self._synced >= SYNC_EVERY_S:
                    os.fsync(fh.fileno())
                    self._synced = now
            self.parts.append(part)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _same_job(before: Mapping[str, Any], now: Mapping[str, Any], directory: Path) -> None:
    fix = f"rerun with --overwrite to start again (or delete {directory})"
    if before.get("batch_format") != FORMAT:
        raise BatchError(f"{directory} was written by another modelpod version; {fix}")
    if before.get("pod", {}).get("digest") != now["pod"]["digest"]:
        was = before.get("pod", {}).get("digest")
        raise BatchError(f"the pod changed since the first run of this job: it was {was}"
                         f", now {now['pod']['digest']} ({now['pod']['ref']}); pin the version the job started with"
                         f" (NAME:VERSION), or {fix}")
    old_inputs = {i["path"]: i for i in before.get("inputs", [])}
    new_inputs = {i["path"]: i for i in now["inputs"]}
    for path in sorted(set(old_inputs) | set(new_inputs)):
        a, b = old_inputs.get(path), new_inputs.get(path)
        if a is None:
            raise BatchError(f"input {path} was added since the first run of this job; {fix}")
        if b is None:
            raise BatchError(f"input {path} is gone since the first run of this job; restore it, or {fix}")
        if a != b:
            what = "size" if a["size"] != b["size"] else "content" if a["edges"] != b["edges"] else "modification time"
            raise BatchError(f"input {path} changed since the first run of this job ({what} differs); restore it, "
                             f"or {fix}")
    for key in _SAME:
        if key not in ("pod", "inputs") and before.get(key) != now.get(key):
            raise BatchError(f"this job was started with other options ({key}: {before.get(key)!r}, now "
                             f"{now.get(key)!r}); run it with the first options, or {fix}")


def _check_disjoint(parts: Sequence[Part], directory: Path) -> None:
    seen: dict[int, list[tuple[int, int]]] = {}
    for p in parts:
        seen.setdefault(p.unit, []).append((p.start, p.end))
    for unit, ranges in seen.items():
        ranges.sort()
        for (_, e1), (s2, _) in zip(ranges, ranges[1:], strict=False):
            if s2 < e1:
                raise BatchError(f"{directory}/{JOURNAL}: parts of unit {unit} overlap; the journal was edited? "
                                 "rerun with --overwrite")


def covered(parts: Iterable[Part]) -> dict[int, list[tuple[int, int]]]:
    """Committed ranges per unit, sorted."""
    out: dict[int, list[tuple[int, int]]] = {}
    for p in parts:
        out.setdefault(p.unit, []).append((p.start, p.end))
    for ranges in out.values():
        ranges.sort()
    return out


def unit_complete(parts: Sequence[Part]) -> bool:
    """The parts of one unit, sorted by start, cover it from row 0 to a part marked last."""
    at = 0
    for p in parts:
        if p.start != at:
            return False
        at = p.end
        if p.last:
            return True
    return False
