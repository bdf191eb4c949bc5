"""The build-time load check: the pod loads and predicts its sample with only the image's packages.

The runtime and deps layers are unpacked (once per layer key) under the cache, and the probe runs
in an interpreter that sees those two directories and the standard library, nothing else, in
the image's PYTHONPATH order. It runs on the build host, so only where the host can stand in for
the image: the same CPython minor version, machine, and a glibc at least the base's.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from modelpod import probe
from modelpod.errors import ImageError
from modelpod.image.plan import DEPS_DIR, RUNTIME_DIR, LayerSpec
from modelpod.image.wheels import Target
from modelpod.pod import Pod


def host_mismatch(target: Target) -> str | None:
    """Why this host cannot stand in for the image (None when it can)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if sys.implementation.name != "cpython" or here != target.python:
        return f"this host runs {sys.implementation.name} {here}, the image CPython {target.python}"
    if not sys.platform.startswith("linux") or platform.machine() != target.machine:
        return f"this host is {sys.platform} {platform.machine()}, the image linux {target.machine}"
    name, version = platform.libc_ver()
    try:
        glibc = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        glibc = ()
    if name != "glibc" or glibc < target.glibc:
        return f"this host's C library ({name or 'unknown'} {version}) is older than the image's"
    return None


def unpack(spec: LayerSpec, cache: Path) -> Path:
    """The layer's files as a directory tree under ``cache`` (made once per layer key)."""
    root = cache / spec.key
    if (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
    try:
        with spec.entries() as entries:
            for e in entries:
                if e.kind != "file" or e.source is None:
                    continue
                dest = work / e.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                with e.source.open() as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        (work / ".complete").write_text("")
        try:
            os.replace(work, root)
        except OSError:  # another build unpacked the same layer first
            if not (root / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def check(pod: Pod, specs: Sequence[LayerSpec], target: Target, cache: Path) -> str:
    """Run the probe against the image's packages; ImageError when the image would fail.

    Returns what happened, for the build report: ``passed``, or ``skipped: <why>``, or
    ``failed here too: <error>`` when the pod fails with the build host's full environment as
    well (then the sample, not the image, is at fault, and the build goes on).
    """
    why = host_mismatch(target)
    if why:
        return f"skipped: {why}"
    trees = {spec.role: unpack(spec, cache) for spec in specs if spec.role in ("runtime", "deps")}
    path = [str(trees[role] / rel) for role, rel in (("deps", DEPS_DIR), ("runtime", RUNTIME_DIR)) if role in trees]
    result = probe.run(pod.path, pod.manifest, path=path)
    if result.ok:
        return "passed"
    if result.missing:
        raise ImageError(
            f"the image would fail at its first request: loading {pod.name} imports {result.missing!r}, which is "
            f"not among the image's Python packages ({result.error}); pack the pod again with --requirements "
            "naming the package that provides it (or build with --no-check)")
    here = probe.run(pod.path, pod.manifest)
    if here.ok:
        raise ImageError(f"the image would fail at its first request: with the image's packages, loading and "
                         f"predicting {pod.name}'s sample fails ({result.error}), while it works here; "
                         "check the pod's locked requirements (or build with --no-check)")
    return f"failed here too: {here.error}"
