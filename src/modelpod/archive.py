"""Pod archives: ``export`` writes a deterministic tar; ``import`` reads one defensively.

The import checks are our own rather than tarfile's extraction filters (which have had bypasses):
every member must be a regular file or directory with a safe relative path; links, devices and
FIFOs are refused; member count and total size are capped; files are written with O_EXCL under a
fresh staging directory and nothing reaches the store until the whole pod verifies.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from modelpod.errors import NotFoundError, PodError, UnsafeArchiveError
from modelpod.pod import MANIFEST_NAME, SIGNATURES_NAME, Pod
from modelpod.store import PodRecord, Ref, Store
from modelpod.trust.policy import TrustPolicy, add_signatures, read_signatures

MAX_MEMBERS = 100_000
MAX_BYTES = 64 * 1024**3
_FIXED_MTIME = 0


def export(pod: Pod, out: Path) -> Path:
    """Write the pod as an uncompressed tar: manifest first, then files sorted by path."""
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        # The signatures travel with the pod, beside the manifest (not a pod file: not in its digest).
        signed = [SIGNATURES_NAME] if (pod.path / SIGNATURES_NAME).is_file() else []
        names = [MANIFEST_NAME, *signed, *sorted(f.path for f in pod.manifest.files)]
        for rel in names:
            src = pod.path / rel
            info = tarfile.TarInfo(rel)
            info.size = src.stat().st_size
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = _FIXED_MTIME, 0o644, 0, 0, "", ""
            with src.open("rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, out)
    return out


def check_member(member: tarfile.TarInfo) -> str:
    """The member's safe relative path, or UnsafeArchiveError."""
    name = member.name
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"refused: {name!r} is a link")
    if member.isdev() or member.isfifo() or member.ischr() or member.isblk():
        raise UnsafeArchiveError(f"refused: {name!r} is a device or FIFO")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"refused: {name!r} is not a regular file or directory")
    if "\x00" in name or "\\" in name:
        raise UnsafeArchiveError(f"refused: {name!r} has a forbidden character")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        raise UnsafeArchiveError(f"refused: {name!r} is an absolute path")
    parts = [part for part in p.parts if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise UnsafeArchiveError(f"refused: {name!r} climbs out of the destination")
    if not parts:
        return ""
    return "/".join(parts)


def extract(archive: Path, dest: Path, max_members: int = MAX_MEMBERS, max_bytes: int = MAX_BYTES) -> None:
    """Extract ``archive`` into the empty directory ``dest`` with every check above."""
    root = dest.resolve()
    total = 0
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise PodError(f"{archive}: not a readable tar archive: {exc}") from None
    with tar:
        for count, member in enumerate(_members(tar), start=1):
            if count > max_members:
                raise UnsafeArchiveError(f"refused: more than {max_members} members")
            rel = check_member(member)
            if not rel:
                continue
            target = root / rel
            # Belt and braces: the resolved parent must stay under the destination.
            if root not in (target.parent.resolve(), *target.parent.resolve().parents):
                raise UnsafeArchiveError(f"refused: {member.name!r} leaves the destination")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            total += member.size
            if total > max_bytes:
                raise UnsafeArchiveError(f"refused: archive unpacks to more than {max_bytes} bytes")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.parent.is_symlink():
                raise UnsafeArchiveError(f"refused: {member.name!r} goes through a link")
            src = tar.extractfile(member)
            if src is None:
                raise UnsafeArchiveError(f"refused: {member.name!r} has no data")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as out:
                _copy_capped(src, out, member.size, member.name)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    try:
        while (member := tar.next()) is not None:
            yield member
    except tarfile.TarError as exc:
        raise PodError(f"corrupt tar archive: {exc}") from None


def _copy_capped(src: IO[bytes], out: IO[bytes], size: int, name: str) -> None:
    left = size
    read = src.read
    while left > 0:
        block = read(min(left, 1 << 20))
        if not block:
            raise UnsafeArchiveError(f"refused: {name!r} is truncated")
        out.write(block)
        left -= len(block)


def import_archive(archive: Path, store: Store, name: str | None = None, policy: TrustPolicy | None = None
                   ) -> PodRecord:
    """Import a pod archive into the store as a new version (or return the version already holding
    the same digest under that name); refuses anything unsafe or tampered, and (``policy``) a pod
    its trust policy refuses, before anything reaches the store. Its signatures come along."""
    if not archive.is_file():
        raise PodError(f"{archive}: no such file")
    staging = store.staging()
    try:
        extract(archive, staging)
        pod = Pod.open(staging, verify=True)
        listed = {f.path for f in pod.manifest.files} | {MANIFEST_NAME, SIGNATURES_NAME}
        extra = sorted(
            p.relative_to(staging).as_posix() for p in staging.rglob("*")
            if p.is_file() and p.relative_to(staging).as_posix() not in listed
        )
        if extra:
            raise UnsafeArchiveError(f"refused: {extra[0]} is in the archive but not in the manifest")
        manifest = pod.manifest
        signatures = read_signatures(staging)
        if name and name != manifest.name:
            from dataclasses import replace

            manifest = replace(manifest, name=name)
            signatures = []  # a new name is a new digest: the pod's signatures are not over it
        if policy is not None:
            what = f"pod {manifest.name} in {archive}" + (" (renamed with --name: a new digest)" if name else "")
            policy.check(what, manifest.digest, signatures)
        try:  # the same pod again: the version it already is, not a new one of an identical digest
            rec = store.get(Ref(manifest.name, digest=manifest.digest))
        except NotFoundError:
            rec = store.add(staging, manifest)
        if signatures:
            add_signatures(store.open(rec.ref, verify=False).path, signatures)
        return rec
    finally:
        store.discard(staging)
