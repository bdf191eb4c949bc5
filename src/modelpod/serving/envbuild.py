"""Own environments on disk: a venv per lock under ``$MODELPOD_HOME/envs/<lock digest>``, built once.

Each is made in a staging directory beside its final place, checked (modelpod and the framework
import with only its packages), given its record (``modelpod-env.json``) and renamed into place,
all under a file lock: two servers never build the same one twice, and a crashed build leaves only
a staging directory, never trusted, swept by the next build of that lock. pip (the server's own,
run for the venv's interpreter) installs the pins, wheels only: offline from a wheel cache
(``--no-index --find-links``) when one is given, else from pip's configured index. modelpod itself
is copied in (its code, not its installation, so no server package comes along), with its core
dependencies the lock does not pin, at the versions the server runs; when the server's modelpod
code changes, the copy is refreshed, the packages are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

import modelpod
from modelpod import __version__
from modelpod.errors import ModelpodError, UsageError
from modelpod.locking import walk
from modelpod.serving.launch import CHILD_MODULE

log = logging.getLogger("modelpod.serving")

RECORD = "modelpod-env.json"
_FORMAT = 1  # bump when the layout of an environment changes: every key changes with it
_STAGING = ".staging-"
# modelpod's core requirements, for when its metadata cannot be read (pyproject.toml says the same).
_CORE = ("numpy", "pyyaml", "rich", "httptools", "uvloop; sys_platform != 'win32'", "orjson", "packaging")
_NO_MATCH = re.compile(r"(?:No matching distribution found for|"
                       r"Could not find a version that satisfies the requirement) (\S+)")


class EnvBuildError(ModelpodError):
    """A pod's environment cannot be built; the message names the package and the fix."""

    http_status, grpc_code, exit_code = 400, "FAILED_PRECONDITION", 2

    def __init__(self, message: str, package: str | None = None) -> None:
        super().__init__(message)
        self.package = package



def lock_key(pins: Iterable[str]) -> str:
    """The environment's name: sha256 of the pins (normalised), the interpreter and the platform."""
    normal = sorted(_normal_pin(p) for p in pins)
    data = {"format": _FORMAT, "pins": normal, "python": f"{sys.implementation.name}{sys.version_info[0]}."
            f"{sys.version_info[1]}", "platform": sysconfig.get_platform()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _normal_pin(text: str) -> str:
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return text.strip()
    req.name = canonicalize_name(req.name)
    return str(req)


# -- the cache -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Environment:
    """A built environment and its record."""

    path: Path
    record: Mapping[str, Any]

    @property
    def key(self) -> str:
        return str(self.record["key"])

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def pins(self) -> list[str]:
        return [str(p) for p in self.record.get("pins") or ()]

    def size_bytes(self) -> int:
        total = 0
        for root, _, names in os.walk(self.path):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def to_dict(self) -> dict[str, Any]:
        return {**self.record, "path": str(self.path), "interpreter": str(self.python)}


class EnvCache:
    """The environments under ``home/envs``: look up, build once, list, remove."""

    def __init__(self, home: Path) -> None:
        self.root = home / "envs"

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise UsageError(f"not an environment key: {key!r} (64 hex digits; see modelpod env list)")
        return self.root / key

    def get(self, key: str) -> Environment | None:
        """The built environment of ``key``, or None (absent, or not one this modelpod can trust)."""
        return _read(self.path(key), key)

    def list(self) -> list[Environment]:
        if not self.root.is_dir():
            return []
        found = (_read(p, p.name) for p in sorted(self.root.iterdir()) if re.fullmatch(r"[0-9a-f]{64}", p.name))
        return [e for e in found if e is not None]

    def ensure(self, pins: Sequence[str], *, wheel_cache: Path | None = None, imports: Sequence[str] = (),
               what: str = "the pod") -> tuple[Environment, bool]:
        """The environment of ``pins``, built if needed: (environment, whether this call built it)."""
        key = lock_key(pins)
        found = self.get(key)
        if found is not None and found.record.get("code") == code_digest():
            return found, False
        with self._locked(key):
            found = self.get(key)  # another process may have built it while we waited
            if found is None:
                return self._build(key, pins, wheel_cache, imports, what), True
            if found.record.get("code") != code_digest():
                found = _refresh_modelpod(found)
            return found, False

    def remove(self, key: str) -> bool:
        """Delete one environment (and its staging leftovers); False when there was none."""
        path = self.path(key)
        with self._locked(key):
            self._sweep(key)
            if not path.exists():
                return False
            trash = self.root / f"{_STAGING}{key}-rm-{uuid.uuid4().hex[:8]}"
            path.rename(trash)  # out of sight at once, then deleted
            shutil.rmtree(trash, ignore_errors=True)
            return True

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """One builder per key across processes (an advisory lock on a file beside the envs)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _sweep(self, key: str) -> None:
        """Remove what crashed builds of ``key`` left (we hold its lock: no build of it is running)."""
        for stale in self.root.glob(f"{_STAGING}{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _build(self, key: str, pins: Sequence[str], wheel_cache: Path | None, imports: Sequence[str],
               what: str) -> Environment:
        self._sweep(key)
        final = self.root / key
        if final.exists():  # a directory without a record we trust: made by something else, or damaged
            shutil.rmtree(final)
        staging = self.root / f"{_STAGING}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        source = f"the wheel cache {wheel_cache} (offline)" if wheel_cache else "the package index"
        log.info("building an environment", extra={"fields": {"for": what, "key": key[:12], "pins": len(pins),
                                                               "from": source}})
        started = time.monotonic()
        try:
            _make_venv(staging)
            requirements = [*pins, *runtime_pins(pins)]
            _pip_install(staging, requirements, wheel_cache, what)
            _copy_modelpod(staging)
            _check_imports(staging, ("modelpod.pod", CHILD_MODULE, *imports), what)
            record = {"format": _FORMAT, "key": key, "pins": sorted(pins, key=str.lower),
                      "installed": requirements, "python": sys.version.split()[0],
                      "platform": sysconfig.get_platform(), "source": source, "modelpod": __version__,
                      "code": code_digest(), "created": int(time.time()),
                      "build_seconds": round(time.monotonic() - started, 3)}
            (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("environment built", extra={"fields": {"for": what, "key": key[:12],
                                                        "seconds": record["build_seconds"]}})
        env = _read(final, key)
        assert env is not None
        return env


def _read(path: Path, key: str) -> Environment | None:
    try:
        record = json.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _FORMAT or record.get("key") != key:
        return None
    env = Environment(path, record)
    return env if env.python.exists() else None  # (exists follows the link to the base interpreter)


# -- building ------------------------------------------------------------------------------------
def runtime_pins(pins: Sequence[str]) -> list[str]:
    """modelpod's core dependencies (and theirs) the lock does not pin, at the server's versions."""
    pinned = {canonicalize_name(Requirement(p).name) for p in pins if _parses(p)}
    try:  # (walk leaves out what only an extra needs)
        roots = metadata.requires("modelpod") or list(_CORE)
    except metadata.PackageNotFoundError:  # modelpod on the path without its metadata (a checkout)
        roots = list(_CORE)
    found = walk(roots, needed_by="modelpod's runtime")
    return sorted((text for name, text in found.items() if name not in pinned and name != "modelpod"),
                  key=str.lower)


def _parses(text: str) -> bool:
    try:
        Requirement(text)
    except InvalidRequirement:
        return False
    return True


def _make_venv(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["venv failed"])[-1]
        raise EnvBuildError(f"cannot create a virtual environment with {sys.executable}: {tail}")


def _pip_install(env: Path, requirements: Sequence[str], wheel_cache: Path | None, what: str) -> None:
    """pip (the server's own, run for the env's interpreter) installs wheels only."""
    with tempfile.TemporaryDirectory(prefix="modelpod-env-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
               "--disable-pip-version-check", "--no-input", "--no-warn-script-location", "--progress-bar", "off",
               "--only-binary=:all:", "--no-compile", "-r", str(req_file)]
        if wheel_cache is not None:
            if not wheel_cache.is_dir():
                raise EnvBuildError(f"wheel cache {wheel_cache}: no such directory (--wheel-cache, "
                                    "MODELPOD_WHEEL_CACHE or the config's wheel_cache)")
            cmd += ["--no-index", "--find-links", str(wheel_cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise install_error(proc.stderr, wheel_cache, what)


def install_error(stderr: str, wheel_cache: Path | None, what: str) -> EnvBuildError:
    """pip's failure as a message naming the package and the fix."""
    platform = f"CPython {sys.version_info[0]}.{sys.version_info[1]} on {sysconfig.get_platform()}"
    found = _NO_MATCH.search(stderr)
    if found:
        pin = found.group(1).rstrip(".,")
        name = re.split(r"[=<>!~\[; ]", pin, maxsplit=1)[0]
        where = f"in the wheel cache {wheel_cache} (offline)" if wheel_cache else "on the package index"
        fix = (f"put a wheel for {platform} in the wheel cache (pip download --only-binary=:all: --dest "
               f"{wheel_cache} '{pin}')" if wheel_cache else
               "give a wheel cache holding it (--wheel-cache DIR or MODELPOD_WHEEL_CACHE)")
        return EnvBuildError(
            f"cannot build the environment of {what}: no wheel of {pin} for {platform} {where}. Fix: {fix}, "
            f"or repack the model with a {name} version that ships wheels for this platform, "
            "or serve it with env: server", name)
    if "No module named pip" in stderr:
        return EnvBuildError(f"cannot build the environment of {what}: it needs pip in {sys.executable} "
                             "(python -m ensurepip), or build it elsewhere with modelpod env build")
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    tail = " / ".join(lines[-3:]) or "pip failed"
    return EnvBuildError(f"cannot build the environment of {what}: pip failed: {tail}")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over modelpod's own files (what an environment's copy must match)."""
    h = hashlib.sha256()
    for rel, path in _package_files():
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _package_files() -> list[tuple[str, Path]]:
    root = Path(modelpod.__file__).parent
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and "__pycache__" not in rel.split("/") and not rel.endswith((".pyc", ".pyo")):
            out.append((rel, path))
    return out


def site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _copy_modelpod(env: Path, into: str = "modelpod") -> None:
    """modelpod's code and a dist-info naming its version into the env's site-packages."""
    site = site_packages(env)
    target = site / into
    for rel, path in _package_files():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    info = site / f"modelpod-{__version__}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: modelpod\nVersion: {__version__}\n",
                                   encoding="utf-8")
    (info / "INSTALLER").write_text("modelpod-env\n", encoding="utf-8")
    (info / "top_level.txt").write_text("modelpod\n", encoding="utf-8")


def _refresh_modelpod(env: Environment) -> Environment:
    """Swap the env's modelpod copy for this server's code (we hold the env's lock)."""
    site = site_packages(env.path)
    fresh = f".modelpod-{uuid.uuid4().hex[:8]}"
    _copy_modelpod(env.path, into=fresh)
    old = site / f".modelpod-old-{uuid.uuid4().hex[:8]}"
    (site / "modelpod").rename(old)
    (site / fresh).rename(site / "modelpod")
    shutil.rmtree(old, ignore_errors=True)
    record = {**env.record, "code": code_digest(), "modelpod": __version__}
    tmp = env.path / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(env.path / RECORD)
    log.info("environment's modelpod refreshed", extra={"fields": {"key": env.key[:12]}})
    return Environment(env.path, record)


def _check_imports(env: Path, modules: Sequence[str], what: str) -> None:
    """Import modelpod and the framework with only the env's packages, before anyone trusts it."""
    code = "import importlib,sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    proc = subprocess.run([str(env / "bin" / "python"), "-I", "-c", code, *modules],
                          capture_output=True, text=True, check=False, env=child_environ())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        missing = re.search(r"No module named '([^']+)'", proc.stderr)
        hint = (f": the lock lacks the distribution of {missing.group(1)!r}; repack the model with it "
                "in --requirements") if missing else ""
        raise EnvBuildError(f"the environment built for {what} cannot import {', '.join(modules)}: {tail}{hint}")


def child_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables for a process in an own environment: nothing that would put the
    server's packages on its path (PYTHONPATH, PYTHONHOME, the user site)."""
    env = dict(os.environ if base is None else base)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"):
        env.pop(name, None)
    env["PYTHONNOUSERSITE"] = "1"
    return env
