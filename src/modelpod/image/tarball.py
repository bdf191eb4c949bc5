"""Deterministic layer tars: sorted entries, fixed mtime, uid/gid 0, no names, no bytecode.

A layer is written in one streaming pass that hashes the tar (the ``diff_id``) and, when gzip is
on, the compressed bytes (the blob ``digest``) at the same time. gzip comes from zlib with a
fixed header (mtime 0, no file name), so the same entries give the same bytes on every run.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from modelpod.errors import ImageError

GZIP_LEVEL = 6
_SKIP_PARTS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Source(Protocol):
    """Something an entry's bytes can be read from, opened only while the tar is written."""

    def open(self) -> IO[bytes]: ...


@dataclass(frozen=True)
class FileSource:
    path: Path

    def open(self) -> IO[bytes]:
        return self.path.open("rb")


@dataclass(frozen=True)
class BytesSource:
    data: bytes

    def open(self) -> IO[bytes]:
        import io

        return io.BytesIO(self.data)


@dataclass(frozen=True)
class Entry:
    """One tar member; ``path`` is relative (no leading slash), POSIX."""

    path: str
    kind: str = "file"  # file | dir | symlink | hardlink
    mode: int = 0o644
    size: int = 0
    source: Source | None = None
    linkname: str = ""
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class LayerDigests:
    """What writing a layer produced: blob digest, uncompressed digest, blob size."""

    digest: str
    diff_id: str
    size: int
    compressed: bool


def skipped(rel: str) -> bool:
    """True for bytecode and caches: they hold timestamps and are rebuilt (or not needed) anyway."""
    parts = rel.split("/")
    return any(p in _SKIP_PARTS for p in parts) or rel.endswith(_SKIP_SUFFIXES)


def file_entry(path: str, source: Path | bytes, executable: bool = False) -> Entry:
    """A regular file with a normalised mode (0755 when executable, else 0644)."""
    if isinstance(source, bytes):
        return Entry(path, "file", 0o755 if executable else 0o644, len(source), BytesSource(source))
    return Entry(path, "file", 0o755 if executable else 0o644, source.stat().st_size, FileSource(source))


def tree_entries(root: Path, prefix: str = "", *, keep_metadata: bool = False) -> list[Entry]:
    """Entries for everything under ``root``, placed under ``prefix``.

    By default modes are normalised (0755/0644) and owners are root. ``keep_metadata`` keeps the
    permission bits and numeric owners, for whole root filesystems. Hard links become tar hard
    links to the first path (in sorted order) that shares the inode; sockets and devices are left
    out (a container runtime provides /dev).
    """
    found: list[tuple[str, os.stat_result, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in (*dirnames, *filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not keep_metadata and skipped(rel):
                continue
            found.append((rel, full.lstat(), full))
    found.sort(key=lambda item: _key(item[0]))
    base = prefix.strip("/")
    first_of_inode: dict[tuple[int, int], str] = {}
    entries: list[Entry] = []
    for rel, st, full in found:
        path = f"{base}/{rel}" if base else rel
        perm = stat.S_IMODE(st.st_mode) if keep_metadata else (0o755 if st.st_mode & 0o111 else 0o644)
        uid, gid = (st.st_uid, st.st_gid) if keep_metadata else (0, 0)
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(path, "dir", perm if keep_metadata else 0o755, uid=uid, gid=gid))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(path, "symlink", 0o777, linkname=os.readlink(full), uid=uid, gid=gid))
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in first_of_inode:
                entries.append(Entry(path, "hardlink", perm, linkname=first_of_inode[inode], uid=uid, gid=gid))
                continue
            first_of_inode[inode] = path
            entries.append(Entry(path, "file", perm, st.st_size, FileSource(full), uid=uid, gid=gid))
    return entries


def _key(path: str) -> tuple[str, ...]:
    # Component-wise order keeps every directory before its children ("a" < "a/b" < "a-b").
    return tuple(path.split("/"))


def normalise(entries: Iterable[Entry]) -> list[Entry]:
    """Sorted entries, later duplicates winning, every missing parent directory added (0755)."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        path = e.path.strip("/")
        if not path or path == ".":
            continue
        by_path[path] = e if e.path == path else _replace_path(e, path)
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in by_path:
                by_path[parent] = Entry(parent, "dir", 0o755)
    return sorted(by_path.values(), key=lambda e: _key(e.path))


def _replace_path(e: Entry, path: str) -> Entry:
    from dataclasses import replace

    return replace(e, path=path)


class _Sink:
    """A write-only file object that hashes, optionally gzips, and forwards what tarfile writes."""

    def __init__(self, out: Writable, level: int | None, on_bytes: Callable[[int], None] | None) -> None:
        self.out = out
        self.raw = hashlib.sha256()
        self.packed = hashlib.sha256()
        self.size = 0
        self.on_bytes = on_bytes
        # wbits 31: a gzip wrapper whose header zlib fills with mtime 0 and no file name.
        self.zip = zlib.compressobj(level, zlib.DEFLATED, 31) if level is not None else None

    def write(self, data: bytes) -> int:
        self.raw.update(data)
        self._emit(self.zip.compress(data) if self.zip else bytes(data))
        if self.on_bytes:
            self.on_bytes(len(data))
        return len(data)

    def finish(self) -> None:
        if self.zip:
            self._emit(self.zip.flush())

    def _emit(self, chunk: bytes) -> None:
        if chunk:
            self.packed.update(chunk)
            self.out.write(chunk)
            self.size += len(chunk)


def write_layer(
    entries: Iterable[Entry],
    out: Writable,
    *,
    mtime: int = 0,
    gzip_level: int | None = GZIP_LEVEL,
    on_bytes: Callable[[int], None] | None = None,
) -> LayerDigests:
    """Write ``entries`` as one deterministic tar (gzip unless ``gzip_level`` is None) to ``out``."""
    sink = _Sink(out, gzip_level, on_bytes)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for e in normalise(entries):
            info = tarfile.TarInfo(e.path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, e.uid, e.gid, "", ""
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if e.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = e.linkname
                tar.addfile(info)
            elif e.kind == "file":
                if e.source is None:
                    raise ImageError(f"layer entry {e.path}: no content")
                info.size = e.size
                with e.source.open() as fh:
                    tar.addfile(info, fh)
            else:
                raise ImageError(f"layer entry {e.path}: unknown kind {e.kind!r}")
    sink.finish()
    raw = "sha256:" + sink.raw.hexdigest()
    packed = "sha256:" + sink.packed.hexdigest()
    return LayerDigests(packed, raw, sink.size, sink.zip is not None)


def open_layer(path: Path) -> tarfile.TarFile:
    """A layer blob opened for streaming reads (plain or gzip); zstd is refused clearly."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"\x28\xb5\x2f\xfd":
        raise ImageError(f"layer {path.name}: zstd-compressed layers are not supported yet")
    try:
        return tarfile.open(path, mode="r|*")
    except tarfile.TarError as exc:
        raise ImageError(f"layer {path.name}: not a readable tar: {exc}") from None
