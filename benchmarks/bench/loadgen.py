"""The load generator: Debian's wrk with post.lua, pinned to its own core, bounded by -d."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import LOADGEN_CPU, LUA_SCRIPT

WRK = shutil.which("wrk") or "/usr/bin/wrk"
_RESULT = re.compile(r"^BENCH_RESULT (\{.*\})$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)


class LoadError(RuntimeError):
    """wrk failed or printed nothing we could parse."""


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    ok_rps: float
    wrk_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    socket_errors: int
    timeouts: int
    p50_us: int  # wrk's histogram in microseconds, as post.lua prints it (the ms fields derive from these)
    p99_us: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wrk_command(url: str, concurrency: int, duration_s: int) -> list[str]:
    return [
        "taskset",
        "-c",
        LOADGEN_CPU,
        WRK,
        "-t1",
        f"-c{concurrency}",
        f"-d{duration_s}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]


def parse(output: str, concurrency: int) -> LoadResult:
    match = _RESULT.search(output)
    if match is None:
        raise LoadError(f"no BENCH_RESULT line in wrk output:\n{output[-2000:]}")
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["non2xx"]
    rps = _RPS.search(output)
    return LoadResult(
        concurrency=concurrency,
        duration_s=round(duration, 3),
        requests=raw["requests"],
        ok_rps=ok / duration if duration > 0 else 0.0,
        wrk_rps=float(rps.group(1)) if rps else raw["requests"] / max(duration, 1e-9),
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        non2xx=raw["non2xx"],
        socket_errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"],
        timeouts=raw["timeouts"],
        p50_us=int(raw["p50_us"]),
        p99_us=int(raw["p99_us"]),
    )


def run_wrk(url: str, body_path: Path, concurrency: int, duration_s: int, log_path: Path,
            headers: dict[str, str] | None = None) -> LoadResult:
    """One closed-loop point: `concurrency` keep-alive connections for `duration_s` seconds."""
    env = {**os.environ, "BENCH_BODY_FILE": str(body_path),
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())}
    cmd = wrk_command(url, concurrency, duration_s)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish within {duration_s + 60}s") from exc
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise LoadError(f"wrk exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return parse(proc.stdout, concurrency)
