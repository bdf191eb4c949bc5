"""Staging areas under ``HOME/tmp``: each is held by its owner's lock, so what a dead owner left is
known to be garbage and swept by the next store operation.

``tmp/stage-XXXX/`` comes with ``tmp/stage-XXXX.lock``, on which the owning process holds an
exclusive ``flock`` for as long as it uses the directory; the kernel drops the lock when the
process dies, however it dies. A sweep takes each lock it can: the owner is gone, so the directory
and its lock are removed. The lock file is created under a temporary name, locked, and only then
renamed into place, so no sweep can take a lock before its owner has it. Entries without a lock
(left by older versions, or by a crash between two system calls) are swept once they are old.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"
STALE_S = 3600.0

# Locks this process holds: staging directory -> the open, flock-ed lock file.
_HELD: dict[str, int] = {}


@dataclass(frozen=True)
class Swept:
    """One entry a sweep removed (or, in a dry run, would remove)."""

    path: Path
    bytes: int
    owner: str | None  # the staging name whose owner is dead, when a lock proved it


def create(tmp: Path, prefix: str = "stage-") -> Path:
    """A fresh, empty, locked staging directory under ``tmp``."""
    fd, pending = tempfile.mkstemp(dir=tmp, prefix=".new-")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = Path(tempfile.mkdtemp(dir=tmp, prefix=prefix))
        os.rename(pending, _lock_of(path))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pending)
        raise
    _HELD[str(path)] = fd
    return path


def release(path: Path) -> None:
    """Remove a staging directory (whatever is left in it) and drop its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _HELD.pop(str(path), None)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_of(path))
    if fd is not None:
        os.close(fd)


def alive(tmp: Path, name: str) -> bool:
    """Whether the owner of staging ``name`` still holds its lock (this process counts)."""
    if str(tmp / name) in _HELD:
        return True
    try:
        fd = os.open(_lock_of(tmp / name), os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # not ours to judge (another user's store, say): count it as alive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(tmp: Path, *, dry_run: bool = False, stale_s: float = STALE_S, now: float | None = None) -> list[Swept]:
    """Remove what dead owners left under ``tmp``; returns what was (or would be) removed."""
    now = time.time() if now is None else now
    out: list[Swept] = []
    try:
        entries = sorted(tmp.iterdir())
    except OSError:
        return out
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX):
            target = entry.with_name(entry.name[: -len(LOCK_SUFFIX)])
            if str(target) not in _HELD:
                out.extend(_take(entry, target, dry_run))
        elif not _lock_of(entry).exists() and str(entry) not in _HELD:
            try:
                old = now - entry.lstat().st_mtime > stale_s
            except FileNotFoundError:
                continue
            if old:
                out.append(Swept(entry, _size(entry), None))
                if not dry_run:
                    _remove(entry)
    return out


def _take(lock: Path, target: Path, dry_run: bool) -> list[Swept]:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return []  # its owner is alive
    try:
        found = Swept(target, _size(target) + _size(lock), target.name)
        if not dry_run:
            _remove(target)
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)
    return [found]


def _lock_of(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
        return path.lstat().st_size
    except OSError:
        return 0
