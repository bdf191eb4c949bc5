"""Local Store: content-addressed blobs plus an SQLite index under ``$MODELPOD_HOME``.

Layout::

    HOME/blobs/sha256/<hex>       every file once, read-only, whatever pods share it
    HOME/pods/<digest-hex>/       a pod materialised from hard links to its blobs
    HOME/index.db                 pods (name, version, digest), aliases, counters, file refs
    HOME/tmp/                     staging, each directory locked by its owner (``staging``)

Nothing half-written becomes visible: blobs and pod directories are renamed into place, and the
version is given in the same SQLite transaction that records the pod.

Blob references across processes: ``add`` first *claims* every blob it will use (a row naming
its staging directory, committed before it looks at the blob), records the pod and its file
references in one transaction, builds the pod directory, and drops its claims last. A blob is
unlinked only inside a write transaction that sees neither a reference nor a live claim, so no
other process can take a reference between the decision and the unlink. A claim whose owner died (its staging lock is
free) counts for nothing; what a killed ``pack``/``import``/``pull`` left is removed by the next
``Store`` opened on the home (its staging) and by ``gc`` (unreferenced blobs, stray pod dirs).
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

from modelpod import staging as _staging
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
CREATE INDEX IF NOT EXISTS pod_files_sha ON pod_files(sha256);
CREATE TABLE IF NOT EXISTS blob_claims (sha256 TEXT NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (sha256, owner));
"""

_REF = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._-]*)(?::(?P<version>[0-9]+)|@(?P<alias>[A-Za-z][A-Za-z0-9._-]*)|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def is_path(text: str) -> bool:
    """True when a reference is written as a path (``./lr``, ``/abs/lr``, ``~/lr``, anything with a
    ``/``); a bare word is always a store name, whatever directory happens to share it."""
    return "/" in text or "\\" in text or text.startswith((".", "~"))


def directory_hint(ref: str) -> str:
    """For a store name that missed: how to name a pod directory of that name instead (or "")."""
    if not is_path(ref) and (Path(ref) / MANIFEST_NAME).is_file():
        return f"; ./{ref} is a pod directory: write it as a path (./{ref}) to use it"
    return ""


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
class GcReport:
    """What ``Store.gc`` freed (or, with ``dry_run``, would free)."""

    blobs: int
    blob_bytes: int
    pod_dirs: int
    staging: int
    staging_bytes: int
    dry_run: bool = False

    @property
    def freed_bytes(self) -> int:
        return self.blob_bytes + self.staging_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "blob_bytes": self.blob_bytes, "pod_dirs": self.pod_dirs,
                "staging": self.staging, "staging_bytes": self.staging_bytes,
                "freed_bytes": self.freed_bytes, "dry_run": self.dry_run}


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

    def __init__(self, home: Path, sweep: bool = True) -> None:
        """Open (or create) the store; ``sweep``: first remove what dead owners left in staging."""
        self.home = Path(home)
        self.blobs = self.home / "blobs" / "sha256"
        self.pods = self.home / "pods"
        self.tmp = self.home / "tmp"
        for d in (self.blobs, self.pods, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)
        if sweep:
            self._drop_owners([s.owner for s in _staging.sweep(self.tmp) if s.owner])

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
        """A fresh empty directory on the store's filesystem (so renames into place are atomic),
        locked by this process; give it back with ``discard``."""
        return _staging.create(self.tmp)

    def discard(self, path: Path) -> None:
        """Remove a directory ``staging`` gave, and its lock."""
        _staging.release(path)

    def _drop_owners(self, owners: list[str]) -> None:
        """Forget the claims of dead (or finished) owners, and the blobs only they claimed."""
        if not owners:
            return
        with self._db(write=True) as db:
            shas: set[str] = set()
            for owner in owners:
                shas |= {s for (s,) in db.execute("SELECT sha256 FROM blob_claims WHERE owner=?", (owner,))}
                db.execute("DELETE FROM blob_claims WHERE owner=?", (owner,))
            self._unlink_unreferenced(db, shas)

    def _unlink_unreferenced(self, db: sqlite3.Connection, shas: set[str], dry_run: bool = False) -> list[int]:
        """Inside a write transaction: unlink each blob of ``shas`` that no pod references and no
        live owner claims (stale claims are dropped on the way); the sizes of those unlinked."""
        gone: list[int] = []
        for sha in sorted(shas):
            if db.execute("SELECT 1 FROM pod_files WHERE sha256=? LIMIT 1", (sha,)).fetchone():
                continue
            owners = [o for (o,) in db.execute("SELECT owner FROM blob_claims WHERE sha256=?", (sha,))]
            live = [o for o in owners if _staging.alive(self.tmp, o)]
            if live:
                continue
            path = self.blobs / sha
            try:
                gone.append(path.stat().st_size)
            except FileNotFoundError:
                continue
            if not dry_run:
                db.executemany("DELETE FROM blob_claims WHERE sha256=? AND owner=?", [(sha, o) for o in owners])
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return gone

    # -- writing --------------------------------------------------------------------------------
    def add(self, directory: Path, manifest: Manifest) -> PodRecord:
        """Store the pod whose files lie in ``directory`` (hashes re-checked) as a new version."""
        for entry in manifest.files:
            src = directory / entry.path
            if not src.is_file() or src.is_symlink():
                raise IntegrityError(f"{entry.path}: listed in the manifest but missing", entry.path)
        work = self.staging()  # room for blob copies, and the owner of this add's claims
        owner = work.name
        try:
            with self._db(write=True) as db:
                db.executemany("INSERT OR IGNORE INTO blob_claims(sha256, owner) VALUES(?, ?)",
                               [(f.sha256, owner) for f in manifest.files])
            for entry in manifest.files:
                # _put_blob hashes the copy it makes; hashing the source first as well would read
                # every (possibly multi-GB) weights file one more time for nothing.
                self._put_blob(directory / entry.path, entry.sha256, entry.path, work)
            rec = self._record_new(manifest)
            # After the record: a pod directory never outlives a killed add (open() builds it again).
            self._materialise(manifest)
        finally:
            self.discard(work)
            self._drop_owners([owner])  # the claims; after a failure, also the blobs only they held
        return rec

    def _record_new(self, manifest: Manifest) -> PodRecord:
        digest = manifest.digest
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

    def _put_blob(self, src: Path, sha: str, rel: str, work: Path) -> Path:
        """Put one file in place as a blob; the caller has claimed ``sha`` (committed) already, so an
        existing blob cannot be unlinked under it."""
        dest = self.blobs / sha
        if dest.exists():
            return dest
        fd, tmp = tempfile.mkstemp(dir=work, prefix="blob-")
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
            self.discard(work)
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
        trash = self.staging()
        try:
            with self._db(write=True) as db:
                for rec in targets:
                    db.execute("DELETE FROM pods WHERE name=? AND version=?", (rec.name, rec.version))
                    db.execute("DELETE FROM aliases WHERE name=? AND version=?", (rec.name, rec.version))
                    if not db.execute("SELECT 1 FROM pods WHERE digest=?", (rec.digest,)).fetchone():
                        db.execute("DELETE FROM pod_files WHERE digest=?", (rec.digest,))
                        self._move_away(rec.digest.removeprefix("sha256:"), trash)
                # Unlinked before COMMIT: no other process can reference these blobs in between.
                self._unlink_unreferenced(db, {f.sha256 for rec in targets for f in rec.manifest.files})
        finally:
            self.discard(trash)
        return targets

    def _move_away(self, hexdigest: str, trash: Path) -> None:
        """Move a pod directory out of ``pods/`` in one rename: a reader sees all of it or none."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.pods / hexdigest, trash / hexdigest)

    def gc(self, dry_run: bool = False) -> GcReport:
        """Remove what no pod references: blobs, stray pod directories, dead owners' staging."""
        swept = _staging.sweep(self.tmp, dry_run=dry_run)
        trash = self.staging()
        try:
            with self._db(write=True) as db:
                if not dry_run:
                    for owner in {s.owner for s in swept if s.owner}:
                        db.execute("DELETE FROM blob_claims WHERE owner=?", (owner,))
                sizes = self._unlink_unreferenced(db, {p.name for p in self.blobs.iterdir()}, dry_run=dry_run)
                digests = {d.removeprefix("sha256:") for (d,) in db.execute("SELECT DISTINCT digest FROM pods")}
                stray = sorted(d.name for d in self.pods.iterdir() if d.name not in digests)
                if not dry_run:
                    for name in stray:
                        self._move_away(name, trash)
        finally:
            self.discard(trash)
        return GcReport(blobs=len(sizes), blob_bytes=sum(sizes), pod_dirs=len(stray),
                        staging=len(swept), staging_bytes=sum(s.bytes for s in swept), dry_run=dry_run)

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


__all__ = ["ConflictError", "GcReport", "PodRecord", "Ref", "Store", "directory_hint", "is_path"]
