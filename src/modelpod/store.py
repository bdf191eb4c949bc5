"""Local Store: content-addressed blobs plus an SQLite index under ``$MODELPOD_HOME``.

Layout::

    HOME/blobs/sha256/<hex>       every file once, read-only, whatever pods share it
    HOME/pods/<digest-hex>/       a pod materialised from hard links to its blobs
    HOME/index.db                 pods (name, version, digest), aliases, counters, file refs
    HOME/tmp/                     staging; anything here is garbage after a crash

Nothing half-written becomes visible: blobs and pod directories are renamed into place, and the
version is given in the same SQLite transaction that records the pod.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpod.errors import ConflictError, IntegrityError, NotFoundError, UsageError
from modelpod.pod import MANIFEST_NAME, Manifest, Pod, sha256_file, write_manifest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pods (
    name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL,
    created REAL NOT NULL, manifest TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS pods_digest ON pods(digest);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pod_files (digest TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (digest, sha256));
"""

_REF = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._-]*)(?::(?P<version>[0-9]+)|@(?P<alias>[A-Za-z][A-Za-z0-9._-]*)|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class PodRecord:
    """One stored version of a pod."""

    name: str
    version: int
    digest: str
    created: float
    manifest: Manifest
    aliases: tuple[str, ...] = field(default=())

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "created": self.created,
            "aliases": list(self.aliases),
            "framework": self.manifest.framework,
            "size": sum(f.size for f in self.manifest.files),
        }


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        if text.startswith("sha256:"):
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
                raise UsageError(f"bad digest reference {text!r}")
            return cls(name="", digest=text)
        m = _REF.match(text)
        if not m:
            raise UsageError(
                f"bad pod reference {text!r}: use NAME, NAME:VERSION, NAME@ALIAS or NAME@sha256:DIGEST"
            )
        version = m.group("version")
        return cls(m.group("name"), int(version) if version else None, m.group("alias"), m.group("digest"))


class Store:
    """The local pod store. Safe for concurrent use by several processes."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.blobs = self.home / "blobs" / "sha256"
        self.pods = self.home / "pods"
        self.tmp = self.home / "tmp"
        for d in (self.blobs, self.pods, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    # -- database -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.home / "index.db", timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            if write:
                db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if write:
                    db.execute("ROLLBACK")
                raise
            if write:
                db.execute("COMMIT")
        finally:
            db.close()

    def _record(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> PodRecord:
        name, version, digest, created, manifest_text = row
        aliases = tuple(
            a for (a,) in db.execute(
                "SELECT alias FROM aliases WHERE name=? AND version=? ORDER BY alias", (name, version)
            )
        )
        return PodRecord(name, version, digest, created, Manifest.from_yaml(manifest_text), aliases)

    # -- staging --------------------------------------------------------------------------------
    def staging(self) -> Path:
        """A fresh empty directory on the store's filesystem (so renames into place are atomic)."""
        return Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp))

    # -- writing --------------------------------------------------------------------------------
    def add(self, directory: Path, manifest: Manifest) -> PodRecord:
        """Store the pod whose files lie in ``directory`` (hashes re-checked) as a new version."""
        for entry in manifest.files:
            src = directory / entry.path
            if not src.is_file() or src.is_symlink():
                raise IntegrityError(f"{entry.path}: listed in the manifest but missing", entry.path)
            # _put_blob hashes the copy it makes; hashing the source first as well would read every
            # (possibly multi-GB) weights file one more time for nothing.
            self._put_blob(src, entry.sha256, entry.path)
        digest = manifest.digest
        self._materialise(manifest)
        text = manifest.to_yaml()
        with self._db(write=True) as db:
            row = db.execute("SELECT last FROM counters WHERE name=?", (manifest.name,)).fetchone()
            version = (row[0] if row else 0) + 1
            db.execute(
                "INSERT INTO counters(name, last) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET last=excluded.last",
                (manifest.name, version),
            )
            created = time.time()
            db.execute(
                "INSERT INTO pods(name, version, digest, created, manifest) VALUES(?,?,?,?,?)",
                (manifest.name, version, digest, created, text),
            )
            db.executemany(
                "INSERT OR IGNORE INTO pod_files(digest, sha256) VALUES(?, ?)",
                [(digest, f.sha256) for f in manifest.files],
            )
        return PodRecord(manifest.name, version, digest, created, manifest)

    def _put_blob(self, src: Path, sha: str, rel: str) -> Path:
        dest = self.blobs / sha
        if dest.exists():
            return dest
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            if sha256_file(Path(tmp)) != sha:
                raise IntegrityError(f"{rel}: does not match its manifest sha256 (changed while packing?)", rel)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return dest

    def _materialise(self, manifest: Manifest) -> Path:
        """Build HOME/pods/<hex> from hard links to blobs (copies where links fail)."""
        final = self.pods / manifest.digest.removeprefix("sha256:")
        if (final / MANIFEST_NAME).exists():
            return final
        work = self.staging()
        try:
            for entry in manifest.files:
                target = work / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blobs / entry.sha256, target)
                except OSError:
                    shutil.copyfile(self.blobs / entry.sha256, target)
            write_manifest(work, manifest)
            try:
                os.replace(work, final)
            except OSError:
                # Another process materialised the same digest first; theirs is as good.
                if not (final / MANIFEST_NAME).exists():
                    raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return final

    def tag(self, name: str, version: int, alias: str) -> PodRecord:
        if not _ALIAS.match(alias) or alias == "latest":
            raise UsageError(
                f"bad alias {alias!r}: a letter, then letters, digits, '.', '_', '-' ('latest' is reserved)"
            )
        with self._db(write=True) as db:
            if not db.execute("SELECT 1 FROM pods WHERE name=? AND version=?", (name, version)).fetchone():
                raise NotFoundError(f"no pod {name}:{version}")
            db.execute(
                "INSERT INTO aliases(name, alias, version) VALUES(?,?,?) "
                "ON CONFLICT(name, alias) DO UPDATE SET version=excluded.version",
                (name, alias, version),
            )
        return self.get(Ref(name, version=version))

    def untag(self, name: str, alias: str) -> None:
        with self._db(write=True) as db:
            cur = db.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias))
            if cur.rowcount == 0:
                raise NotFoundError(f"no alias {name}@{alias}")

    def remove(self, ref: str, all_versions: bool = False) -> list[PodRecord]:
        """Remove one version (or all with ``all_versions``); unreferenced blobs are deleted."""
        parsed = Ref.parse(ref)
        if parsed.version is None and parsed.alias is None and parsed.digest is None and not all_versions:
            raise UsageError(f"'{ref}' names every version; give NAME:VERSION, or --all to remove them all")
        targets = self.list(parsed.name) if (all_versions and parsed.name) else [self.get(parsed)]
        if not targets:
            raise NotFoundError(f"no pod named {parsed.name!r}")
        with self._db(write=True) as db:
            for rec in targets:
                db.execute("DELETE FROM pods WHERE name=? AND version=?", (rec.name, rec.version))
                db.execute("DELETE FROM aliases WHERE name=? AND version=?", (rec.name, rec.version))
                if not db.execute("SELECT 1 FROM pods WHERE digest=?", (rec.digest,)).fetchone():
                    db.execute("DELETE FROM pod_files WHERE digest=?", (rec.digest,))
                    shutil.rmtree(self.pods / rec.digest.removeprefix("sha256:"), ignore_errors=True)
            live = {s for (s,) in db.execute("SELECT sha256 FROM pod_files")}
        for rec in targets:
            for f in rec.manifest.files:
                if f.sha256 not in live:
                    with contextlib.suppress(FileNotFoundError):
                        (self.blobs / f.sha256).unlink()
        return targets

    # -- reading --------------------------------------------------------------------------------
    def get(self, ref: Ref | str) -> PodRecord:
        r = Ref.parse(ref) if isinstance(ref, str) else ref
        with self._db() as db:
            cols = "SELECT name, version, digest, created, manifest FROM pods"
            if r.digest and not r.name:
                row = db.execute(f"{cols} WHERE digest=? ORDER BY created DESC LIMIT 1", (r.digest,)).fetchone()
            elif r.digest:
                row = db.execute(
                    f"{cols} WHERE name=? AND digest=? ORDER BY version DESC LIMIT 1", (r.name, r.digest)
                ).fetchone()
            elif r.version is not None:
                row = db.execute(f"{cols} WHERE name=? AND version=?", (r.name, r.version)).fetchone()
            elif r.alias is not None and r.alias != "latest":
                row = db.execute(
                    f"{cols} WHERE name=? AND version=(SELECT version FROM aliases WHERE name=? AND alias=?)",
                    (r.name, r.name, r.alias),
                ).fetchone()
            else:
                row = db.execute(f"{cols} WHERE name=? ORDER BY version DESC LIMIT 1", (r.name,)).fetchone()
            if row is None:
                raise NotFoundError(f"no pod {_describe(r)} in the store at {self.home}")
            return self._record(db, row)

    def list(self, name: str | None = None) -> list[PodRecord]:
        with self._db() as db:
            q = "SELECT name, version, digest, created, manifest FROM pods"
            if name:
                rows = db.execute(q + " WHERE name=? ORDER BY version", (name,)).fetchall()
            else:
                rows = db.execute(q + " ORDER BY name, version").fetchall()
            return [self._record(db, row) for row in rows]

    def open(self, ref: Ref | str, verify: bool = True) -> Pod:
        """The pod's directory, re-verified file by file unless ``verify`` is False."""
        rec = self.get(ref)
        path = self._materialise(rec.manifest)
        return Pod.open(path, verify=verify, expected_digest=rec.digest)


def _describe(r: Ref) -> str:
    if r.digest and not r.name:
        return r.digest
    if r.version is not None:
        return f"{r.name}:{r.version}"
    if r.alias:
        return f"{r.name}@{r.alias}"
    if r.digest:
        return f"{r.name}@{r.digest}"
    return repr(r.name)


__all__ = ["ConflictError", "PodRecord", "Ref", "Store"]
