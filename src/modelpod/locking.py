"""Locking requirements: exact ``Name==version`` pins for a pod and for the image runtime.

One walker follows installed distributions' ``Requires-Dist`` (with the extras each is required
with, so ``pkg[extra]`` brings the extra's dependencies) under a given marker environment: the pack
host's for a pod's lock, the image's for its runtime layer. Requirement files are taken from this
environment when everything they name is installed at a version they allow (that is what ``pack``
just ran), and resolved by pip's resolver otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from modelpod.errors import UsageError


class NotInstalledError(UsageError):
    """A distribution the walk needs is not installed here."""

    def __init__(self, name: str, needed_by: str) -> None:
        super().__init__(f"{needed_by} needs {name}, which is not installed here")
        self.name = name


def walk(roots: Iterable[str | Requirement], env: Mapping[str, str] | None = None, *,
         strict: bool = False, needed_by: str = "the pod") -> dict[str, str]:
    """Canonical name -> ``Name==version`` for ``roots`` and everything they need, as installed here.

    A root or dependency that is not installed is skipped (optional parts of a framework), or
    raises NotInstalledError with ``strict``.
    """
    marker_env = {k: str(v) for k, v in (env or default_environment()).items()}
    pins: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [r if isinstance(r, Requirement) else Requirement(r) for r in roots]
    todo = [r for r in todo if applies(r, marker_env, ())]
    while todo:
        req = todo.pop()
        key, extras = canonicalize_name(req.name), frozenset(canonicalize_name(e) for e in req.extras)
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if strict:
                raise NotInstalledError(req.name, needed_by) from None
            continue
        pins[key] = f"{dist.metadata['Name']}=={dist.version}"
        for text in dist.requires or ():
            sub = Requirement(text)
            if applies(sub, marker_env, extras):
                todo.append(sub)
    return pins


def applies(req: Requirement, env: Mapping[str, str], extras: Iterable[str]) -> bool:
    """Whether ``req`` is needed under ``env`` when its parent is required with ``extras``."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def merge(*locks: Mapping[str, str]) -> list[str]:
    """Pins by name, later locks winning; sorted for the manifest."""
    out: dict[str, str] = {}
    for lock in locks:
        out.update(lock)
    return sorted(out.values(), key=str.lower)


def as_lock(pins: Iterable[str]) -> dict[str, str]:
    return {canonicalize_name(p.partition("==")[0]): p for p in pins}


# -- requirement files ---------------------------------------------------------------------------
def read_requirements(path: Path) -> list[str] | None:
    """The requirement lines of a requirements file; None when it uses pip options (``-r``, URLs)."""
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-") or line.endswith("\\"):
            return None
        try:
            Requirement(line)
        except InvalidRequirement:
            return None
        out.append(line)
    return out


def pyproject_dependencies(path: Path) -> list[str]:
    """``[project] dependencies`` of a pyproject.toml."""
    if sys.version_info < (3, 11):  # pragma: no cover - tomllib is 3.11+
        raise UsageError(f"{path}: reading pyproject.toml needs Python 3.11; list the packages in requirements.txt")
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    deps = (data.get("project") or {}).get("dependencies") or []
    return [str(d) for d in deps]


def installed_satisfies(lines: Sequence[str], env: Mapping[str, str] | None = None) -> bool:
    """Whether every requirement in ``lines`` is installed here at a version it allows."""
    marker_env = {k: str(v) for k, v in (env or default_environment()).items()}
    for line in lines:
        req = Requirement(line)
        if not applies(req, marker_env, ()):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return False
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return False
    return True


def lock_lines(lines: Sequence[str], source: str) -> dict[str, str]:
    """Pins for requirement lines: from this environment when it satisfies them, else pip's resolver."""
    if installed_satisfies(lines):
        return walk(lines, needed_by=source)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requirements.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return as_lock(resolve(path, source))


def lock_file(path: Path) -> dict[str, str]:
    """Pins for a requirements file (or a pyproject.toml's dependencies)."""
    if not path.is_file():
        raise UsageError(f"requirements file {path}: no such file")
    lines = pyproject_dependencies(path) if path.name == "pyproject.toml" else read_requirements(path)
    if lines is None:  # pip options: only pip can read it
        return as_lock(resolve(path, str(path)))
    return lock_lines(lines, str(path)) if lines else {}


def resolve(path: Path, source: str) -> list[str]:
    """Resolve a requirements file to exact versions with pip's resolver (no install)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--disable-pip-version-check", "--report", str(report), "-r", str(path)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UsageError(f"cannot resolve {source}: {tail}")
        data = json.loads(report.read_text())
    pins = (f"{i['metadata']['name']}=={i['metadata']['version']}" for i in data.get("install", []))
    return sorted(pins, key=str.lower)


# -- imported modules -> distributions -------------------------------------------------------------
def owners(module: str) -> set[str]:
    """Canonical names of the installed distributions providing top-level module ``module``."""
    return {canonicalize_name(d) for d in metadata.packages_distributions().get(module.partition(".")[0]) or ()}
