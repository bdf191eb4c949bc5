"""One virtualenv per peer, installed from the package registry and cached by a marker file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from .config import LOGS_DIR, TORCH_SPEC, EnvSpec

MARKER = ".bench-installed.json"


class InstallError(RuntimeError):
    """A venv could not be created or a package could not be installed."""


def _fingerprint(spec: EnvSpec) -> str:
    text = json.dumps([TORCH_SPEC if spec.needs_torch else "", *spec.requirements])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _base_python() -> str:
    # A venv made from inside a venv should still point at the base interpreter.
    return getattr(sys, "_base_executable", None) or sys.executable


def is_installed(spec: EnvSpec) -> bool:
    marker = spec.path / MARKER
    if not marker.is_file() or not spec.python.exists():
        return False
    return bool(json.loads(marker.read_text()).get("fingerprint") == _fingerprint(spec))


def _run_logged(cmd: list[str], log: Path, deadline_s: float) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=deadline_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise InstallError(f"timed out after {deadline_s:.0f}s: {' '.join(cmd)} (log: {log})") from exc
    if proc.returncode != 0:
        raise InstallError(f"exit {proc.returncode}: {' '.join(cmd)} (log: {log})")


def _pip(spec: EnvSpec, args: list[str], log: Path, deadline_s: float) -> None:
    _run_logged(
        [str(spec.python), "-m", "pip", "install", "--disable-pip-version-check", *args], log, deadline_s
    )


def pip_freeze(spec: EnvSpec) -> dict[str, str]:
    """Installed distribution versions, for the results file."""
    proc = subprocess.run(
        [str(spec.python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        return {}
    return {row["name"].lower(): row["version"] for row in json.loads(proc.stdout)}


def ensure(spec: EnvSpec, deadline_s: float) -> Path:
    """Create and fill the venv unless an identical install is already there; return its python."""
    if is_installed(spec):
        return spec.python
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    log = LOGS_DIR / f"install-{spec.name}.log"
    log.write_text("")
    if not spec.python.exists():
        _run_logged([_base_python(), "-m", "venv", str(spec.path)], log, 300)
    if spec.needs_torch:
        # torch first and alone: later packages then see it satisfied and never fetch a CUDA build.
        _pip(spec, [TORCH_SPEC], log, deadline_s)
        _pip(spec, [*spec.requirements, TORCH_SPEC], log, deadline_s)
    else:
        _pip(spec, list(spec.requirements), log, deadline_s)
    (spec.path / MARKER).write_text(json.dumps({"fingerprint": _fingerprint(spec)}))
    return spec.python
