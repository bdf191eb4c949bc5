"""Wheels for the image's platform: download with pip into a cache, unpack into layer entries.

pip fetches (it knows the user's indexes, certificates and credentials); unpacking is ours. A wheel
is a zip whose purelib/platlib content goes straight into a site-packages directory, so layer
entries are read from the zips directly: no install step, no scripts whose shebangs name the build
machine's interpreter, no bytecode, and the same bytes on every run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from modelpod.errors import ImageError
from modelpod.image.progress import Progress, Silent
from modelpod.image.tarball import Entry, skipped

_MANYLINUX_FLOOR = 17  # manylinux2014 == manylinux_2_17, the oldest tag worth offering


@dataclass(frozen=True)
class Target:
    """The interpreter and platform wheels are chosen for."""

    python: str  # "3.11"
    machine: str = "x86_64"  # x86_64 | aarch64
    glibc: tuple[int, int] = (2, 28)

    @property
    def platforms(self) -> list[str]:
        """Platform tags, most specific first (pip prefers earlier ones)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, _MANYLINUX_FLOOR - 1, -1)]
        return [*tags, f"manylinux2014_{self.machine}"]

    def tags(self) -> list[Tag]:
        major, minor = (int(p) for p in self.python.split("."))
        platforms = self.platforms
        return [*cpython_tags((major, minor), platforms=platforms),
                *compatible_tags((major, minor), interpreter=f"cp{major}{minor}", platforms=platforms)]

    def pip_args(self) -> list[str]:
        out: list[str] = []
        for p in self.platforms:
            out += ["--platform", p]
        return [*out, "--python-version", self.python, "--implementation", "cp", "--only-binary=:all:"]

    def describe(self) -> str:
        return f"CPython {self.python} on manylinux glibc {self.glibc[0]}.{self.glibc[1]} {self.machine}"


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    text: str

    @classmethod
    def parse(cls, text: str) -> Pin:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise ImageError(f"requirement {text!r}: {exc}") from None
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator not in ("==", "===") or "*" in specs[0].version:
            raise ImageError(f"requirement {text!r} is not pinned to one version (name==version)")
        return cls(canonicalize_name(req.name), specs[0].version, f"{req.name}=={specs[0].version}")


def find_cached(pin: Pin, target: Target, cache: Path) -> Path | None:
    """The best wheel of ``pin`` for ``target`` already in ``cache``."""
    rank = {tag: i for i, tag in enumerate(target.tags())}
    best: tuple[int, str, Path] | None = None
    for whl in cache.glob("*.whl"):
        try:
            name, version, _, tags = parse_wheel_filename(whl.name)
        except InvalidWheelFilename:
            continue
        if name != pin.name or version != Version(pin.version):
            continue
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or (score, whl.name) < best[:2]):
            best = (score, whl.name, whl)
    return best[2] if best else None


def ensure_wheels(pins: Sequence[Pin], target: Target, cache: Path, progress: Progress | None = None) -> list[Path]:
    """A wheel per pin for ``target``, downloading what the cache lacks with pip (--no-deps)."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if find_cached(p, target, cache) is None]
    if missing:
        task = (progress or Silent()).task(f"fetch {len(missing)} wheel(s)", len(missing))
        _pip_download(missing, target, cache)
        task.advance(len(missing))
        task.done()
    wheels = []
    for pin in pins:
        whl = find_cached(pin, target, cache)
        if whl is None:
            raise ImageError(f"pip fetched no wheel of {pin.text} usable on {target.describe()}")
        wheels.append(whl)
    return wheels


def _pip_download(pins: Sequence[Pin], target: Target, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "--dest", str(dest), *target.pip_args(), *(p.text for p in pins)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ImageError(f"cannot run pip to fetch wheels: {exc}") from None
    if proc.returncode == 0:
        return
    if "No module named pip" in proc.stderr:
        raise ImageError(f"building an image needs pip in {sys.executable} (python -m ensurepip)")
    m = re.search(r"No matching distribution found for (\S+)", proc.stderr)
    if m:
        raise ImageError(
            f"no wheel of {m.group(1)} for {target.describe()}: only a source distribution, or no build "
            "for this platform; images are assembled from wheels only (pin a version that ships wheels)"
        )
    tail = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    raise ImageError(f"pip could not fetch {', '.join(p.text for p in pins)}: {tail}")


class WheelSet:
    """Open wheels whose members feed a layer; close it after the layer is written."""

    def __init__(self, wheels: Iterable[Path]) -> None:
        self.zips = [zipfile.ZipFile(w) for w in sorted(wheels, key=lambda p: p.name)]

    def __enter__(self) -> WheelSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for z in self.zips:
            z.close()

    def entries(self, prefix: str) -> list[Entry]:
        """Every installable file of every wheel, under ``prefix`` (a site-packages directory)."""
        out: list[Entry] = []
        for z in self.zips:
            for info in z.infolist():
                if info.is_dir():
                    continue
                rel = _installed_path(info.filename)
                if rel is None or skipped(rel):
                    continue
                executable = bool((info.external_attr >> 16) & 0o111)
                out.append(Entry(f"{prefix}/{rel}", "file", 0o755 if executable else 0o644, info.file_size,
                                 _ZipMember(z, info.filename)))
        return out


@dataclass(frozen=True)
class _ZipMember:
    zf: zipfile.ZipFile
    name: str

    def open(self) -> IO[bytes]:
        return self.zf.open(self.name)


def _installed_path(name: str) -> str | None:
    """Where a wheel member lands in site-packages; None for scripts, headers and data files."""
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or name.startswith("/"):
        raise ImageError(f"wheel member {name!r} has an unsafe path")
    if parts[0].endswith(".data") and len(parts) > 2:
        return "/".join(parts[2:]) if parts[1] in ("purelib", "platlib") else None
    return name
