"""What routing and shadows cost: workload A at c=64, routed vs calling the version directly.

Usage: .venv/bin/python benchmarks/traffic.py [--quick] [--duration S] [--rounds N] [--models-python PY]

One `modelpod serve` (pinned to the server core, wrk on the other) holds workload A's model as two
versions (the same weights, packed twice) and two routes from a `--config` file:

- direct:  POST /v2/models/A/versions/1/infer              (the version itself: no split)
- routed:  POST /v2/models/A/infer, route A = 1:90, 2:10    (the weighted split, ids kept for feedback)
- shadow:  POST /v2/models/shadowed/infer, 1:100 + shadow 2 (every request copied to version 2)

The three are driven in turn, ``--rounds`` times, and the medians compared. Targets (issue 11):
routed/direct >= 0.97; and a shadow at 100 % costs the primary no more than the shadow's own
compute, i.e. shadow/direct >= 0.5 when the model is the whole cost (the shadow doubles the work
on one core). Needs what run.py needs (wrk, taskset, 2 cores); a quiet machine for real numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import loadgen, modelpod, procs, venvs
from bench.config import LOGS_DIR, MAX_BATCH_ROWS, MAX_BATCH_WAIT_MS, REPO_DIR, SERVER_CPU, WORK_DIR, WORKLOADS_ENV
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
        "shadowed": {"variants": [{"model": f"{name}:1", "weight": 100}], "shadow": [f"{name}:2"]},
    }}))
    port = procs.free_port()
    spec = modelpod.serve_named(name, port)
    cmd = [*modelpod.base_command(), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-rows", str(MAX_BATCH_ROWS), "--max-batch-wait-ms", f"{MAX_BATCH_WAIT_MS:g}", "--no-grpc"]
    base = f"http://127.0.0.1:{port}/v2/models"
    urls = {"direct": f"{base}/{name}/versions/1/infer", "routed": f"{base}/{name}/infer",
            "shadow": f"{base}/shadowed/infer"}
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
    ratios = {"routed/direct": rps["routed"] / rps["direct"], "shadow/direct": rps["shadow"] / rps["direct"]}
    print()
    print(f"workload A, c={CONCURRENCY}, {rounds} round(s) of {duration} s (medians)")
    print(f"{'mode':<8}{'req/s':>12}{'p50 ms':>10}")
    for mode in urls:
        print(f"{mode:<8}{rps[mode]:>12,.0f}{p50[mode]:>10.2f}")
    print(f"routed/direct  {ratios['routed/direct']:.3f}   (target >= 0.97)")
    print(f"shadow/direct  {ratios['shadow/direct']:.3f}   (target >= 0.50: the shadow's own compute, one core)")
    RESULTS.write_text(json.dumps({"duration_s": duration, "rounds": rounds, "points": points, "rps": rps,
                                   "p50_ms": p50, "ratios": ratios}, indent=2))
    print(f"\nresults: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
