"""What routing and shadows cost: workload A at c=64, routed vs calling the version directly.

Usage: .venv/bin/python benchmarks/traffic.py [--quick] [--duration S] [--rounds N] [--models-python PY]

One `modelpod serve` (pinned to the server core, wrk on the other) holds workload A's model as two
versions (the same weights, packed twice) and two routes from a `--config` file:

- direct:  POST /v2/models/A/versions/1/infer              (the version itself: no split)
- routed:  POST /v2/models/one/infer, route one = 1:100     (the routing decision alone: same version, same batches)
- split:   POST /v2/models/A/infer, route A = 1:90, 2:10    (a real split: two versions, each batching its share)
- shadow:  POST /v2/models/shadowed/infer, 1:100 + shadow 2 (every request copied to version 2)

The modes are driven in turn, ``--rounds`` times, and the medians compared. Targets (issue 11):
routed/direct >= 0.97 (what routing costs); split/direct is printed too: it adds what splitting
costs the model (version 2's batches are a tenth the size, so more predict calls per row); and a
shadow at 100 % costs the primary no more than the shadow's own
compute, i.e. shadow/direct >= 0.5 when the model is the whole cost (the shadow doubles the work
on one core). Needs what run.py needs (wrk, taskset, 2 cores); a quiet machine for real numbers.

``--instructions`` also counts the engine's instructions per request (valgrind's callgrind over
`tools/engine_loop.py`, no HTTP, a model that adds one): direct, routed and split, each the
difference of two runs with different request counts. Counts are stable on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import loadgen, modelpod, procs, venvs
from bench.config import (
    LOGS_DIR,
    MAX_BATCH_ROWS,
    MAX_BATCH_WAIT_MS,
    REPO_DIR,
    SERVER_CPU,
    TOOLS_DIR,
    WORK_DIR,
    WORKLOADS_ENV,
)
from bench.workloads import make_models

CONCURRENCY = 64
RESULTS = WORK_DIR / "traffic.json"


def log(message: str) -> None:
    print(f"[traffic] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per point, one round")
    p.add_argument("--duration", type=int, help="seconds per wrk point (default 10; 2 quick)")
    p.add_argument("--rounds", type=int, help="rounds of the three modes (default 3; 1 quick)")
    p.add_argument("--models-python", type=Path, help="a Python with scikit-learn, skops and torch to make the "
                   "models with (default: run.py's workloads venv, installed on first use)")
    p.add_argument("--instructions", action="store_true",
                   help="also count instructions per request on the engine path (needs valgrind)")
    args = p.parse_args(argv)
    duration = args.duration or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    LOGS_DIR.mkdir(parents=True, exist_ok=True)

    python = args.models_python or venvs.ensure(WORKLOADS_ENV, 1800)
    workload = make_models(python)["A"]
    modelpod.check_available()
    modelpod.reset_home()
    name = workload.model_name
    for copy in (1, 2):
        packed = modelpod.pack_file(workload.modelpod_file, name,
                                    ["--sample", str(workload.sample_path), "--label", f"copy={copy}"])
        log(f"packed {packed['name']}:{packed['version']}")
    config = WORK_DIR / "traffic-serve.yaml"
    config.write_text(json.dumps({"routes": {
        name: {"variants": [{"model": f"{name}:1", "weight": 90}, {"model": f"{name}:2", "weight": 10}]},
        "one": {"variants": [{"model": f"{name}:1", "weight": 100}]},
        "shadowed": {"variants": [{"model": f"{name}:1", "weight": 100}], "shadow": [f"{name}:2"]},
    }}))
    port = procs.free_port()
    spec = modelpod.serve_named(name, port)
    cmd = [*modelpod.base_command(), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-rows", str(MAX_BATCH_ROWS), "--max-batch-wait-ms", f"{MAX_BATCH_WAIT_MS:g}", "--no-grpc"]
    base = f"http://127.0.0.1:{port}/v2/models"
    urls = {"direct": f"{base}/{name}/versions/1/infer", "routed": f"{base}/one/infer",
            "split": f"{base}/{name}/infer", "shadow": f"{base}/shadowed/infer"}
    body = workload.body_path.read_bytes()
    wrk_log = LOGS_DIR / "wrk-traffic.log"
    wrk_log.write_text("")
    server = procs.launch("modelpod-traffic", cmd, spec.env, REPO_DIR, LOGS_DIR / "server-traffic.log", SERVER_CPU)
    points: dict[str, list[dict[str, Any]]] = {mode: [] for mode in urls}
    try:
        for url in urls.values():
            procs.wait_first_prediction(server, url, body, 180, spec.headers)
        loadgen.run_wrk(urls["direct"], workload.body_path, 8, 1 if args.quick else 3, wrk_log, spec.headers)
        for r in range(rounds):
            for mode, url in urls.items():
                point = loadgen.run_wrk(url, workload.body_path, CONCURRENCY, duration, wrk_log, spec.headers)
                points[mode].append(point.to_json())
                log(f"round {r + 1} {mode:<6} c={CONCURRENCY}: {point.ok_rps:,.0f} req/s, p50 {point.p50_ms:.2f} ms, "
                    f"p99 {point.p99_ms:.2f} ms, non-2xx {point.non2xx}")
    finally:
        procs.stop(server)
    rps = {mode: statistics.median(p["ok_rps"] for p in pts) for mode, pts in points.items()}
    p50 = {mode: statistics.median(p["p50_ms"] for p in pts) for mode, pts in points.items()}
    ratios = {mode + "/direct": rps[mode] / rps["direct"] for mode in ("routed", "split", "shadow")}
    print()
    print(f"workload A, c={CONCURRENCY}, {rounds} round(s) of {duration} s (medians)")
    print(f"{'mode':<8}{'req/s':>12}{'p50 ms':>10}")
    for mode in urls:
        print(f"{mode:<8}{rps[mode]:>12,.0f}{p50[mode]:>10.2f}")
    print(f"routed/direct  {ratios['routed/direct']:.3f}   (target >= 0.97: the routing decision)")
    print(f"split/direct   {ratios['split/direct']:.3f}   (a 90/10 split over two versions: routing + smaller batches)")
    print(f"shadow/direct  {ratios['shadow/direct']:.3f}   (target >= 0.50: the shadow's own compute, one core)")
    result: dict[str, Any] = {"duration_s": duration, "rounds": rounds, "points": points, "rps": rps,
                              "p50_ms": p50, "ratios": ratios}
    if args.instructions:
        result["instructions"] = instructions()
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {RESULTS}")
    return 0


def _collected(target: str, gathers: int) -> int:
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           str(modelpod.VENV / "bin" / "python"), str(TOOLS_DIR / "engine_loop.py"), target,
                           str(gathers)], capture_output=True, text=True, timeout=1800, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_DIR / "src"), "OMP_NUM_THREADS": "1"})
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count: {proc.stderr[-400:]}")
    return int(found.group(1))


def instructions(low: int = 20, high: int = 100) -> dict[str, Any]:
    """Instructions per request on the engine path, per target, and routed/split over direct."""
    per = {t: (_collected(t, high) - _collected(t, low)) / ((high - low) * 64) for t in ("direct", "routed", "split")}
    out = {"per_request": per, "routed/direct": per["routed"] / per["direct"],
           "split/direct": per["split"] / per["direct"]}
    print("\nengine path, instructions per request (callgrind, no HTTP):")
    for target, n in per.items():
        print(f"  {target:<8}{n:>10,.0f}")
    print(f"  routed/direct {out['routed/direct']:.3f}  split/direct {out['split/direct']:.3f}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
