"""Own environments: which pods get one, and the interpreter their replicas run with.

A pod whose locked requirements this server's environment does not satisfy (another scikit-learn
release, a package not installed here), or that the config marks ``env: own``, is served by
replicas running in a virtual environment built from exactly its pins (``serving/envbuild.py``);
``env: server`` forces the server's packages. Pins of the serving machinery (``SERVER_OWNED``) do
not count: the server's versions of those serve any pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpod.errors import UsageError
from modelpod.serving.launch import Launch
from modelpod.settings import Settings

log = logging.getLogger("modelpod.serving")

MODES = ("auto", "own", "server")
# Serving machinery, not model behaviour: the server's versions serve any pod, so a pod pinning
# other versions of these does not need an environment of its own for that alone. numpy is not
# here: arrays, pickles and numerics depend on it.
SERVER_OWNED = frozenset({
    "modelpod", "pip", "setuptools", "wheel", "pyyaml", "rich", "markdown-it-py", "mdurl", "pygments",
    "httptools", "uvloop", "orjson", "packaging", "grpcio", "protobuf",
})

# -- deciding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    """A pin the server's environment does not satisfy."""

    pin: str
    installed: str | None  # the version here, None when not installed

    def describe(self) -> str:
        return f"{self.pin} (here {self.installed})" if self.installed else f"{self.pin} (not installed here)"


# A pin written NAME==VERSION whose version is the installed one, character for character, holds.
# Every pin of a pod packed with this environment is decided so, from the names of the
# ``NAME-VERSION.dist-info`` folders on sys.path (what pip writes): no packaging (its parsers and
# markers, some fifteen modules), no importlib.metadata (its email parser) at a server's start.
# Anything else, and a pin whose distribution has no such folder, goes through packaging.
_EXACT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)")


def mismatches(requirements: Iterable[str]) -> list[Mismatch]:
    """The pins of a lock that this environment does not satisfy, serving machinery aside."""
    out = []
    found_here: dict[str, str] | None = None
    compare: Callable[[str], Mismatch | None] | None = None
    for text in requirements:
        exact = _EXACT.fullmatch(text)
        if exact is not None:
            name = _canonical(exact[1])
            if name in SERVER_OWNED:
                continue
            found_here = found_here if found_here is not None else dist_info_versions()
            if found_here.get(name) == exact[2]:
                continue
        compare = compare or _comparer()
        mismatch = compare(text)
        if mismatch is not None:
            out.append(mismatch)
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_info_versions(path: Iterable[str] | None = None) -> dict[str, str]:
    """Canonical name -> version of the distributions whose ``NAME-VERSION.dist-info`` folder is on
    ``path`` (sys.path); the first entry that has one wins, as for imports."""
    out: dict[str, str] = {}
    for entry in sys.path if path is None else path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in names:
            if folder.endswith(".dist-info"):
                name, _, version = folder[: -len(".dist-info")].partition("-")
                if version:
                    out.setdefault(_canonical(name), version)
    return out


def _installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _comparer() -> Callable[[str], Mismatch | None]:
    """Checks one pin with packaging: its markers, its specifier (raises ImportError without packaging)."""
    # Imported here: an image's runtime layer has no packaging (serving there never compares).
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    from modelpod.locking import applies

    marker_env = {k: str(v) for k, v in default_environment().items()}

    def compare(text: str) -> Mismatch | None:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            return None  # the pod's manifest was checked at pack; nothing to compare
        if canonicalize_name(req.name) in SERVER_OWNED or not applies(req, marker_env, ()):
            return None
        version = _installed(req.name)
        if version is None:
            return Mismatch(text, None)
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return Mismatch(text, version)
        return None

    return compare


@dataclass(frozen=True)
class EnvChoice:
    """Where a pod's replicas run: the server's environment, or one built from ``pins`` (offline
    from ``wheel_cache`` when set)."""

    own: bool
    reason: str
    pins: tuple[str, ...] = ()
    wheel_cache: Path | None = None
    mode: str = "auto"  # as configured: auto | own | server

    @property
    def key(self) -> str:
        from modelpod.serving.envbuild import lock_key

        return lock_key(self.pins)


def choose(requirements: Sequence[str], mode: str = "auto", wheel_cache: Path | None = None) -> EnvChoice:
    """``own`` or ``server`` as asked; ``auto``: own when a pin is not satisfied here."""
    if mode not in MODES:
        raise UsageError(f"env must be one of {', '.join(MODES)}, got {mode!r}")
    pins = tuple(sorted(requirements, key=str.lower))
    if mode == "server":
        return EnvChoice(False, "env: server", mode=mode)
    if mode == "own":
        return EnvChoice(True, "env: own", pins, wheel_cache, mode)
    try:
        differ = mismatches(pins)
    except ImportError:  # an image's runtime layer: its deps layer is the pod's lock
        return EnvChoice(False, "no packaging here to compare the lock with: the server's environment", mode=mode)
    if not differ:
        return EnvChoice(False, "the server's packages satisfy the lock", mode=mode)
    shown = ", ".join(m.describe() for m in differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    return EnvChoice(True, f"the lock differs from the server's packages: {shown}", pins, wheel_cache, mode)


# What a replica in an own environment must not inherit from the server: anything that would put
# the server's packages on its path. (Empty values count as unset for CPython.)
CHILD_ENV = {"PYTHONPATH": "", "PYTHONHOME": "", "PYTHONSTARTUP": "", "PYTHONNOUSERSITE": "1"}


async def launch_in_env(choice: EnvChoice, home: Path, framework: str, label: str) -> Launch:
    """The launch of a replica in ``choice``'s environment, built first when it is not yet (in a
    thread: the loop keeps serving the other models meanwhile). Raises EnvBuildError."""
    started = time.monotonic()
    from modelpod.serving.envbuild import EnvCache

    env, built = await asyncio.to_thread(EnvCache(home).ensure, choice.pins, wheel_cache=choice.wheel_cache,
                                         imports=framework_imports(framework), what=f"model {label}")
    log.info("own environment ready", extra={"fields": {
        "model": label, "key": env.key[:12], "built": built, "seconds": round(time.monotonic() - started, 3),
        "why": choice.reason, "python": str(env.python)}})
    return Launch(python=str(env.python), env={**CHILD_ENV, "VIRTUAL_ENV": str(env.path)},
                  why=f"own environment {env.key[:12]}")




# -- configuration -------------------------------------------------------------------------------
def pop_env(values: dict[str, Any], name: str, where: str, override: str | None = None) -> dict[str, str]:
    """Pop ``env`` from a config mapping: {name: mode} when given (``override``, the command line's
    ``--env``, wins over the file's global key)."""
    mode = values.pop("env", None)
    if override is not None:
        mode, where = override, "--env (MODELPOD_POD_ENV)"
    if mode is None:
        return {}
    if mode not in MODES:
        raise UsageError(f"{where}: env must be one of {', '.join(MODES)}, got {mode!r}")
    return {name: str(mode)}


def pop_wheel_cache(values: dict[str, Any], settings: Settings) -> Path | None:
    """Pop the config file's ``wheel_cache``; the settings' (``--wheel-cache``,
    ``MODELPOD_WHEEL_CACHE``) wins. A relative path in the file is taken from the file's directory."""
    raw = values.pop("wheel_cache", None)
    if settings.wheel_cache is not None:
        return Path(settings.wheel_cache).expanduser()
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise UsageError(f"config: wheel_cache must be a directory path, got {raw!r}")
    path = Path(raw).expanduser()
    if not path.is_absolute() and settings.config is not None:
        path = Path(settings.config).parent / path
    return path


def framework_imports(framework: str) -> tuple[str, ...]:
    """The modules a framework's pods import (checked in a freshly built environment)."""
    from modelpod.errors import FrameworkError
    from modelpod.frameworks import module

    try:
        return tuple(module(framework).IMPORTS)
    except FrameworkError:
        return ()
