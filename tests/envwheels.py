"""A wheel cache for the own-environment tests, downloaded once per machine from PyPI.

Under ``~/.cache/modelpod-tests/env-wheels/<python>-<platform>`` (or ``$MODELPOD_TEST_CACHE``): the
wheels of what a scikit-learn pod's lock pins at this server's versions, modelpod's own runtime
dependencies, and two scikit-learn releases other than the installed one (``SKLEARN_RELEASES``).
The first run downloads about 100 MB; later runs read the cache only. When PyPI cannot be reached
the tests skip, and fail instead under ``MODELPOD_REQUIRE_DOCKER=1`` (CI, where it can).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from modelpod.locking import walk
from modelpod.serving.envbuild import runtime_pins

CACHE = Path(os.environ.get("MODELPOD_TEST_CACHE") or Path.home() / ".cache" / "modelpod-tests")
# Two scikit-learn releases that ship CPython 3.11 wheels and work with the installed numpy/scipy.
SKLEARN_RELEASES = ("1.7.2", "1.8.0")
REQUIRE = os.environ.get("MODELPOD_REQUIRE_DOCKER") == "1"


def unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"required for MODELPOD_REQUIRE_DOCKER=1: {reason}")
    pytest.skip(reason)


def wanted_pins() -> list[str]:
    """What the cache must hold: a scikit-learn pod's lock here, modelpod's runtime, the releases."""
    lock = walk(["numpy", "scikit-learn", "skops"])
    lock.pop("scikit-learn")  # the pods pin the releases below instead of the server's
    pins = sorted({*lock.values(), *runtime_pins(list(lock.values()))})
    return [*pins, *(f"scikit-learn=={v}" for v in SKLEARN_RELEASES)]


def has_wheel(directory: Path, pin: str) -> bool:
    name, _, version = pin.partition("==")
    want = (canonicalize_name(name), Version(version))
    for whl in directory.glob("*.whl"):
        try:
            got = parse_wheel_filename(whl.name)
        except InvalidWheelFilename:
            continue
        if (got[0], got[1]) == want:
            return True
    return False


def wheel_cache() -> Path:
    """The cache directory, downloading what it lacks (one process at a time)."""
    directory = CACHE / "env-wheels" / f"cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        missing = [p for p in wanted_pins() if not has_wheel(directory, p)]
        releases = [p for p in missing if p.startswith("scikit-learn==")]
        rest = [p for p in missing if p not in releases]
        # One pip run per scikit-learn release: pip refuses two versions of one name in one run.
        for group in ([rest] if rest else []) + [[r] for r in releases]:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
                 "--disable-pip-version-check", "--dest", str(directory), *group],
                capture_output=True, text=True, timeout=900, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
                unavailable(f"cannot download wheels for the environment tests ({', '.join(group)}): {tail}")
    return directory


def make_wheel(directory: Path, name: str, version: str, body: str) -> Path:
    """A tiny pure-Python wheel of module ``name`` (its ``__init__`` is ``body``), built by hand."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": body.encode(),
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: modelpod-tests\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return out
