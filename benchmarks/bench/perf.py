"""Triton's perf_analyzer (from the tritonclient wheel) against an OIP v2 server, when it can run."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .config import LOADGEN_CPU, PERF_ENV, VENVS_DIR

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PerfUnavailable(RuntimeError):
    """perf_analyzer is missing or cannot run here; the message says why."""


def binary() -> Path:
    return PERF_ENV.path / "bin" / "perf_analyzer"


def _cudart_dirs() -> list[str]:
    site = VENVS_DIR / PERF_ENV.name / "lib"
    return [str(p) for p in site.glob("python3*/site-packages/nvidia/cuda_runtime/lib")]


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env["LD_LIBRARY_PATH"] = ":".join([*_cudart_dirs(), env.get("LD_LIBRARY_PATH", "")]).strip(":")
    return env


def check_runs() -> None:
    if not binary().exists():
        raise PerfUnavailable(f"no perf_analyzer at {binary()}")
    try:
        proc = subprocess.run(
            [str(binary()), "--version"], capture_output=True, text=True, env=_env(), timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PerfUnavailable(f"perf_analyzer does not start: {exc}") from exc
    text = proc.stdout + proc.stderr
    if "error while loading shared libraries" in text:
        raise PerfUnavailable(text.strip().splitlines()[-1])


def _get_json(url: str, headers: dict[str, str]) -> dict[str, Any]:
    with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return dict(json.loads(response.read()))


def _input_shape_arg(port: int, model: str, features: int, headers: dict[str, str]) -> list[str]:
    """`--shape NAME:1,F` for the first input (used by perf_analyzer only where dims are -1)."""
    try:
        meta = _get_json(f"http://127.0.0.1:{port}/v2/models/{model}", headers)
        name = str(meta["inputs"][0]["name"])
    except (OSError, ValueError, KeyError, IndexError):
        name = "input-0"
    return ["--shape", f"{name}:1,{features}"]


def _parse_csv(text: str) -> dict[str, Any]:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise PerfUnavailable("perf_analyzer wrote an empty CSV")
    row = rows[-1]
    return {
        "concurrency": int(row["Concurrency"]),
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


# How each wire format is asked for: JSON tensors over REST (the reference), the binary tensor data
# extension over REST, and gRPC (perf_analyzer's gRPC client; tensors are always binary there).
WIRES = ("json", "binary", "grpc")


def _wire_flags(wire: str, port: int, grpc_port: int | None) -> list[str]:
    if wire == "grpc":
        if grpc_port is None:
            raise PerfUnavailable("no gRPC port")
        return ["-i", "grpc", "-u", f"127.0.0.1:{grpc_port}"]
    if wire not in ("json", "binary"):
        raise ValueError(f"unknown wire format {wire!r}")
    return ["-i", "http", "-u", f"127.0.0.1:{port}", "--input-tensor-format", wire, "--output-tensor-format", wire]


def run_point(
    port: int, model: str, features: int, concurrency: int, requests: int, out_dir: Path, log_path: Path,
    headers: dict[str, str] | None = None, wire: str = "json", grpc_port: int | None = None,
) -> dict[str, Any]:
    """One perf_analyzer measurement at fixed concurrency in one wire format (``WIRES``), windows of
    ``requests`` requests. The input's shape is read over REST at ``port`` whatever the wire.

    Asynchronous, two client threads: in its default synchronous mode perf_analyzer runs one thread
    per outstanding request, and at c=64 on its one core those threads starved the thread that
    closes the measurement windows (at ~20k requests/s no window closed within two minutes)."""
    csv_path = out_dir / f"perf_{model}_{wire}_c{concurrency}.csv"
    csv_path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    # perf_analyzer re-measures until 3 windows agree within --stability-percentage; on a shared
    # 2-core machine they rarely do, so the bound is loose and the last window is what we report.
    # Zeros, not its default random bytes: random FP32 bit patterns include NaN/Inf, which it then
    # writes into the JSON body as bare NaN (invalid JSON).
    flags = [*f"-m {model}".split(), *_wire_flags(wire, port, grpc_port)]
    flags += (
        f"--concurrency-range {concurrency}:{concurrency} "
        f"--async --max-threads 2 --measurement-mode count_windows --measurement-request-count {requests} "
        "--max-trials 3 --stability-percentage 1000 --input-data zero"
    ).split()
    headers = headers or {}
    for name, value in headers.items():  # gRPC metadata keys are lower case
        flags += ["-H", f"{name.lower() if wire == 'grpc' else name}:{value}"]
    cmd = ["taskset", "-c", LOADGEN_CPU, str(binary()), *flags, *_input_shape_arg(port, model, features, headers)]
    cmd += ["-f", str(csv_path)]
    deadline = 120
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=deadline, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PerfUnavailable(f"perf_analyzer did not finish within {deadline}s") from exc
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0 or not csv_path.exists():
        text = (proc.stdout + proc.stderr).strip()
        hint = (" (the server has no gRPC ModelConfig, Triton's RPC that perf_analyzer reads first)"
                if wire == "grpc" and "model config" in text else "")
        raise PerfUnavailable(f"perf_analyzer exit {proc.returncode}: {' | '.join(text.splitlines()[-3:])}{hint}")
    return {"wire": wire, **_parse_csv(csv_path.read_text())}
