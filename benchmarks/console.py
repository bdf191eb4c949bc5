"""What the console costs the inference path: workload A at c=64, `serve` with and without `--console`.

Usage: .venv/bin/python benchmarks/console.py [--quick] [--duration S] [--rounds N] [--models-python PY]

The same `modelpod serve` of workload A's model (pinned to the server core, wrk on the other) is
started without and with `--console`, in turn, ``--rounds`` times. While the console is on, a
thread polls its endpoints as an open page does (metrics every second, overview and errors every
three), so the numbers include the page being watched. Target (issue 16): console/plain >= 0.97
(the console samples once a second; nothing runs per request beyond one path prefix test).
Needs what run.py needs (wrk, taskset, 2 cores); a quiet machine for real numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import loadgen, modelpod, procs, venvs
from bench.config import LOGS_DIR, SERVER_CPU, WORK_DIR, WORKLOADS_ENV
from bench.workloads import make_models

CONCURRENCY = 64
RESULTS = WORK_DIR / "console.json"


def log(message: str) -> None:
    print(f"[console] {message}", flush=True)


def watch(base: str, headers: dict[str, str], stop: threading.Event, counted: list[int]) -> None:
    """Poll the console as an open page would, until ``stop``; appends the polls answered 200."""
    answered = 0
    tick = 0
    while not stop.wait(1.0):
        paths = ["metrics"] + (["overview", "errors"] if tick % 3 == 0 else [])
        for path in paths:
            req = urllib.request.Request(f"{base}/console/api/{path}", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                    answered += resp.status == 200
            except OSError:
                pass
        tick += 1
    counted.append(answered)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per point, one round")
    p.add_argument("--duration", type=int, help="seconds per wrk point (default 10; 2 quick)")
    p.add_argument("--rounds", type=int, help="rounds of the two modes (default 3; 1 quick)")
    p.add_argument("--models-python", type=Path, help="a Python with scikit-learn, skops and torch to make the "
                   "models with (default: run.py's workloads venv, installed on first use)")
    args = p.parse_args(argv)
    duration = args.duration or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    LOGS_DIR.mkdir(parents=True, exist_ok=True)

    python = args.models_python or venvs.ensure(WORKLOADS_ENV, 1800)
    workload = make_models(python)["A"]
    modelpod.check_available()
    modelpod.reset_home()
    packed = modelpod.pack(workload)
    log(f"packed {packed['name']}:{packed['version']}")
    body = workload.body_path.read_bytes()
    wrk_log = LOGS_DIR / "wrk-console.log"
    wrk_log.write_text("")
    points: dict[str, list[dict[str, Any]]] = {"plain": [], "console": []}
    polls = 0
    for r in range(rounds):
        for mode in points:
            port = procs.free_port()
            spec = modelpod.serve_named(workload.model_name, port)
            cmd = [*spec.cmd, *(["--console"] if mode == "console" else [])]
            server = procs.launch(f"modelpod-{mode}", cmd, spec.env, spec.cwd, LOGS_DIR / f"server-{mode}.log",
                                  SERVER_CPU)
            url = f"http://127.0.0.1:{port}/v2/models/{workload.model_name}/infer"
            stop = threading.Event()
            watcher: threading.Thread | None = None
            counted: list[int] = []
            try:
                procs.wait_first_prediction(server, url, body, 180, spec.headers)
                loadgen.run_wrk(url, workload.body_path, 8, 1, wrk_log, spec.headers)
                if mode == "console":
                    watcher = threading.Thread(target=watch, daemon=True,
                                               args=(f"http://127.0.0.1:{port}", spec.headers, stop, counted))
                    watcher.start()
                point = loadgen.run_wrk(url, workload.body_path, CONCURRENCY, duration, wrk_log, spec.headers)
            finally:
                stop.set()
                if watcher is not None:
                    watcher.join(30)
                procs.stop(server)
            polls += sum(counted)
            points[mode].append(point.to_json())
            log(f"round {r + 1} {mode:<8} c={CONCURRENCY}: {point.ok_rps:,.0f} req/s, p50 {point.p50_ms:.2f} ms, "
                f"p99 {point.p99_ms:.2f} ms, non-2xx {point.non2xx}")
    rps = {mode: statistics.median(p["ok_rps"] for p in pts) for mode, pts in points.items()}
    p99 = {mode: statistics.median(p["p99_ms"] for p in pts) for mode, pts in points.items()}
    ratio = rps["console"] / rps["plain"] if rps["plain"] else 0.0
    print()
    print(f"workload A, c={CONCURRENCY}, {rounds} round(s) of {duration} s (medians); console polls answered: {polls}")
    print(f"{'mode':<10}{'req/s':>12}{'p99 ms':>10}")
    for mode in points:
        print(f"{mode:<10}{rps[mode]:>12,.0f}{p99[mode]:>10.2f}")
    print(f"console/plain  {ratio:.3f}   (target >= 0.97)")
    RESULTS.write_text(json.dumps({"duration_s": duration, "rounds": rounds, "points": points, "rps": rps,
                                   "p99_ms": p99, "ratio": ratio, "console_polls": polls}, indent=2))
    print(f"\nresults: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
