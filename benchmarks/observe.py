"""What observability costs: workload A at c=64 with tracing + payload log + drift on at their
defaults, against the same server with all three off.

Usage: .venv/bin/python benchmarks/observe.py [--quick] [--duration S] [--rounds N] [--models-python PY]
                                             [--model-dir DIR]

Two `modelpod serve` runs of workload A's model (pinned to the server core, wrk on the other), in
turn, ``--rounds`` times, medians compared:

- off: ``drift: off`` in the config, no ``payload_log``, no ``OTEL_*``: nothing observed;
- on:  tracing to an OTLP/HTTP receiver in this process (``OTEL_EXPORTER_OTLP_ENDPOINT``, default
  sampler: the caller's flag, at most 10 new traces a second), ``payload_log: {sink: FILE}`` (the
  default sample, 0.05) and drift against a 2,000-row reference packed into the pod.

Target (issue 16): on/off >= 0.95. Needs what run.py needs (wrk, taskset, 2 cores); a quiet machine
for real numbers; ``--quick`` only shows that it runs.
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import loadgen, modelpod, procs, venvs
from bench.config import LOGS_DIR, MAX_BATCH_ROWS, MAX_BATCH_WAIT_MS, REPO_DIR, SERVER_CPU, WORK_DIR, WORKLOADS_ENV
from bench.workloads import MODEL_NAMES, Workload, make_models

CONCURRENCY = 64
RESULTS = WORK_DIR / "observe.json"


def log(message: str) -> None:
    print(f"[observe] {message}", flush=True)


class _Sink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (and counts them) so the exporter's work is real."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per point, one round")
    p.add_argument("--duration", type=int, help="seconds per wrk point (default 10; 2 quick)")
    p.add_argument("--rounds", type=int, help="rounds of the two modes (default 3; 1 quick)")
    p.add_argument("--models-python", type=Path, help="a Python with scikit-learn, skops and torch to make the "
                   "models with (default: run.py's workloads venv, installed on first use)")
    p.add_argument("--model-dir", type=Path, help="workload A's files already made (model.skops, sample.npy, "
                   "body.json: tools/make_models.py's A/), instead of making them in the workloads venv")
    args = p.parse_args(argv)
    duration = args.duration or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    LOGS_DIR.mkdir(parents=True, exist_ok=True)

    if args.model_dir is not None:
        features = int(np.load(args.model_dir / "sample.npy").shape[1])
        workload = Workload("A", MODEL_NAMES["A"], args.model_dir.resolve(), features, (), "INT64", False)
    else:
        workload = make_models(args.models_python or venvs.ensure(WORKLOADS_ENV, 1800))["A"]
    modelpod.check_available()
    modelpod.reset_home()
    name = workload.model_name
    reference = WORK_DIR / "observe-reference.npy"
    np.save(reference, np.random.default_rng(0).normal(size=(2000, workload.features)).astype(np.float32))
    packed = modelpod.pack_file(workload.modelpod_file, name,
                                ["--sample", str(workload.sample_path), "--reference", str(reference)])
    log(f"packed {packed['name']}:{packed['version']} with a drift reference")

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    sink.posts = 0  # type: ignore[attr-defined]
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    payloads = WORK_DIR / "observe-payloads.jsonl"
    configs = {"off": {"drift": "off"}, "on": {"payload_log": {"sink": str(payloads)}}}
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}", "OTEL_SERVICE_NAME": "bench"}
    body = workload.body_path.read_bytes()
    wrk_log = LOGS_DIR / "wrk-observe.log"
    wrk_log.write_text("")
    points: dict[str, list[dict[str, Any]]] = {mode: [] for mode in configs}
    try:
        for r in range(rounds):
            for mode, config in configs.items():
                path = WORK_DIR / f"observe-{mode}.yaml"
                path.write_text(json.dumps(config))
                port = procs.free_port()
                spec = modelpod.serve_named(name, port)
                cmd = [*modelpod.base_command(), "serve", name, "--config", str(path), "--host", "127.0.0.1",
                       "--port", str(port), "--max-batch-rows", str(MAX_BATCH_ROWS),
                       "--max-batch-wait-ms", f"{MAX_BATCH_WAIT_MS:g}", "--no-grpc"]
                env = {**spec.env, **(otel if mode == "on" else {})}
                url = f"http://127.0.0.1:{port}{workload.route}"
                server = procs.launch(f"modelpod-observe-{mode}", cmd, env, REPO_DIR,
                                      LOGS_DIR / f"server-observe-{mode}.log", SERVER_CPU)
                try:
                    procs.wait_first_prediction(server, url, body, 180, spec.headers)
                    loadgen.run_wrk(url, workload.body_path, 8, 1 if args.quick else 3, wrk_log, spec.headers)
                    point = loadgen.run_wrk(url, workload.body_path, CONCURRENCY, duration, wrk_log, spec.headers)
                finally:
                    procs.stop(server)
                points[mode].append(point.to_json())
                log(f"round {r + 1} {mode:<4} c={CONCURRENCY}: {point.ok_rps:,.0f} req/s, p50 {point.p50_ms:.2f} ms, "
                    f"p99 {point.p99_ms:.2f} ms, non-2xx {point.non2xx}")
    finally:
        sink.shutdown()
    rps = {mode: statistics.median(p["ok_rps"] for p in pts) for mode, pts in points.items()}
    p99 = {mode: statistics.median(p["p99_ms"] for p in pts) for mode, pts in points.items()}
    ratio = rps["on"] / rps["off"] if rps["off"] else 0.0
    logged = sum(1 for _ in payloads.open()) if payloads.exists() else 0
    print()
    print(f"workload A, c={CONCURRENCY}, {rounds} round(s) of {duration} s (medians)")
    print(f"{'mode':<6}{'req/s':>12}{'p99 ms':>10}")
    for mode in configs:
        print(f"{mode:<6}{rps[mode]:>12,.0f}{p99[mode]:>10.2f}")
    print(f"on/off  {ratio:.3f}   (target >= 0.95)   payload lines {logged}, OTLP exports {sink.posts}")  # type: ignore[attr-defined]
    RESULTS.write_text(json.dumps({"duration_s": duration, "rounds": rounds, "points": points, "rps": rps,
                                   "p99_ms": p99, "ratio": ratio, "payload_lines": logged,
                                   "otlp_posts": sink.posts}, indent=2))  # type: ignore[attr-defined]
    print(f"\nresults: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
