"""modelpod itself, run from the repository's own venv: pack each workload, then `modelpod serve`.

Everything here is guarded: while `modelpod` (or one of its commands) is missing, the harness
reports "modelpod: not available (reason)" and benchmarks the peers alone.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .config import MAX_BATCH_ROWS, MAX_BATCH_WAIT_MS, REPO_DIR, WORK_DIR
from .peers import LaunchSpec, base_env
from .workloads import Workload

VENV = REPO_DIR / ".venv"
HOME = WORK_DIR / "modelpod_home"


class ModelpodUnavailable(RuntimeError):
    """modelpod cannot be used (yet); the message is the reason printed in the report."""


# A/B of two commits: `--baseline REV` serves REV's sources (git archive) from the same venv,
# with its own store; None is the working tree's modelpod.
_BASELINE: dict[str, Path] = {}


def set_baseline(src: Path | None) -> None:
    """Make the following pack/serve calls use the sources in ``src`` (None: the repository's)."""
    _BASELINE.clear()
    if src is not None:
        _BASELINE["src"] = src


def base_command() -> list[str]:
    script = VENV / "bin" / "modelpod"
    if script.exists() and not _BASELINE:
        return [str(script)]
    return [str(VENV / "bin" / "python"), "-m", "modelpod"]


def _home() -> Path:
    return HOME.with_name(HOME.name + "-baseline") if _BASELINE else HOME


def _env() -> dict[str, str]:
    extra = {"MODELPOD_HOME": str(_home())}
    if _BASELINE:
        extra["PYTHONPATH"] = str(_BASELINE["src"])
    return base_env(VENV, extra)


def baseline_sources(rev: str) -> Path:
    """``git archive REV src`` unpacked under the work dir; returns its ``src`` folder."""
    target = WORK_DIR / f"baseline-{rev}"
    if not (target / "src" / "modelpod").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO_DIR), "archive", rev, "src"], capture_output=True,
                                 check=False)
        if archive.returncode != 0:
            raise ModelpodUnavailable(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    compile_sources(target / "src")
    return target / "src"


def compile_sources(src: Path) -> None:
    """Byte-compile the modelpod package under ``src``, as installing its wheel does. The framework
    floors import their libraries from site-packages, compiled when pip installed them; an editable
    install run with PYTHONDONTWRITEBYTECODE=1 (as on the project's machines) would otherwise compile
    every modelpod module at every launch: 0.7e9 instructions of a `modelpod serve` start of the
    ONNX small pod, more than the ONNX floor's whole run (0.56e9; callgrind, 2026-12-02)."""
    subprocess.run([str(VENV / "bin" / "python"), "-m", "compileall", "-q", str(src / "modelpod")],
                   capture_output=True, timeout=300, check=False)


def check_available() -> str:
    """The modelpod version string, or raise ModelpodUnavailable with the reason."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise ModelpodUnavailable(f"no repository venv at {VENV}")
    code = "import modelpod.cli, importlib.metadata as m; print(m.version('modelpod'))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=_env())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
        raise ModelpodUnavailable(f"modelpod.cli not importable: {last}")
    compile_sources(_BASELINE.get("src", REPO_DIR / "src"))
    return proc.stdout.strip()


def reset_home() -> None:
    """A fresh store per harness run, so versions and digests start from 1 every time."""
    home = _home()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)


def _last_json_object(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return dict(json.loads(line))
    return dict(json.loads(text))


def pack(workload: Workload) -> dict[str, Any]:
    """`modelpod pack MODEL --name NAME --sample SAMPLE.npy --json` -> {"name", "version", "digest"}."""
    return pack_file(workload.modelpod_file, workload.model_name, ["--sample", str(workload.sample_path)])


def pack_file(path: Path, name: str, extra: list[str]) -> dict[str, Any]:
    cmd = [*base_command(), "pack", str(path), "--name", name, *extra, "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelpodUnavailable("`modelpod pack` did not finish within 600s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise ModelpodUnavailable(f"`modelpod pack` exit {proc.returncode}: {' | '.join(detail)}")
    try:
        return _last_json_object(proc.stdout)
    except ValueError as exc:
        raise ModelpodUnavailable(f"`modelpod pack --json` printed no JSON: {proc.stdout[-300:]!r}") from exc


def _serve_help() -> str:
    try:
        proc = subprocess.run(
            [*base_command(), "serve", "--help"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout


def serve_launch(workload: Workload, port: int) -> LaunchSpec:
    return serve_named(workload.model_name, port)


def serve_grpc_launch(workload: Workload, grpc_port: int, port: int) -> LaunchSpec:
    """As ``serve_launch``, with gRPC on ``grpc_port`` (the wire-format runs of perf_analyzer)."""
    return serve_named(workload.model_name, port, grpc_port)


def serve_named(model_name: str, port: int, grpc_port: int | None = None) -> LaunchSpec:
    """`modelpod serve NAME --host 127.0.0.1 --port P --max-batch-rows 32 --max-batch-wait-ms 5`.

    REST only (`--no-grpc`, when the CLI has it) unless ``grpc_port`` is given (`--grpc-port G`):
    wrk speaks REST, and a default gRPC port could collide with other servers on the machine. Auth
    is on (`MODELPOD_TOKEN`), so every measured request is checked against a bearer token, as in
    production; the peers run without."""
    cmd = [*base_command(), "serve", model_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-batch-rows", str(MAX_BATCH_ROWS), "--max-batch-wait-ms", f"{MAX_BATCH_WAIT_MS:g}"]
    if grpc_port is not None:
        cmd += ["--grpc-port", str(grpc_port)]
    elif "--no-grpc" in _serve_help():
        cmd.append("--no-grpc")
    token = secrets.token_urlsafe(24)
    return LaunchSpec(cmd=cmd, env={**_env(), "MODELPOD_TOKEN": token}, cwd=REPO_DIR,
                      headers={"Authorization": f"Bearer {token}"})


def version_info() -> dict[str, str]:
    try:
        return {"modelpod": check_available()}
    except ModelpodUnavailable:
        return {}
