"""What process replicas cost and buy (issue 12): throughput, latency, scale-out, cold start, memory.

Usage: .venv/bin/python benchmarks/replicas.py [--quick] [--duration S] [--models-python PY] [--only ROWS]

Rows (each one ``modelpod serve`` launch or more, driven by wrk as in run.py):

- ``b-scale``: workload B (the MLP) with ``--isolation process``, 2 replicas vs 1, c=64. The server may
  use both cores and wrk shares them (``taskset -c 0,1`` for both). Target: 2 replicas >= 1.6x.
- ``a-iso``: workload A (the logistic regression), ``--isolation process`` (1 replica) vs ``thread``,
  server on core 0, wrk on core 1, at c=64 (target >= 0.80x) and c=1 (p50 within +0.2 ms).
- ``scale-out``: B with ``--replicas 1:2 --target-inflight 1 --upscale-delay-s 0``; a step from no load
  to c=64; the time until the second replica has answered a batch (polled from the model's metadata).
- ``cold``: launch to first prediction of A, process vs thread, median of 3 (target: process <= thread
  + 0.3 s).
- ``pss``: an ONNX model with 200 MB of weights, 1 vs 2 replicas; PSS of the server's process tree
  after one request to each replica (target: 2 replicas <= 1.3x the PSS of 1); packed twice, as is
  (one intra-op thread per replica: the template keeps it loaded for its replicas to share) and with
  ``--option threads=0`` (ONNX Runtime's own pool: each replica loads its own).

Prints each row's numbers and ratio; everything goes to ``benchmarks/.work/replicas.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import loadgen, modelpod, procs, venvs
from bench.config import LOADGEN_CPU, LOGS_DIR, REPO_DIR, SERVER_CPU, WORK_DIR, WORKLOADS_ENV
from bench.workloads import Workload, make_models

RESULTS = WORK_DIR / "replicas.json"
BOTH = f"{SERVER_CPU},{LOADGEN_CPU}"
ROWS = ("b-scale", "a-iso", "scale-out", "cold", "pss")


def log(message: str) -> None:
    print(f"[replicas] {message}", flush=True)


def wrk(url: str, body: Path, concurrency: int, duration: int, headers: dict[str, str], cpus: str) -> Any:
    """run.py's wrk point, with wrk pinned to ``cpus``."""
    cmd = loadgen.wrk_command(url, concurrency, duration)
    cmd[2] = cpus
    env = {**os.environ, "BENCH_BODY_FILE": str(body),
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in headers.items())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60, check=False)
    with (LOGS_DIR / "wrk-replicas.log").open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise loadgen.LoadError(f"wrk exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return loadgen.parse(proc.stdout, concurrency)


class Served:
    """One ``modelpod serve NAME FLAGS`` launch, stopped on exit."""

    def __init__(self, name: str, flags: list[str], cpus: str, label: str) -> None:
        self.port = procs.free_port()
        self.spec = modelpod.serve_named(name, self.port)
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}/v2/models/{name}"
        self.server = procs.launch(f"modelpod-{label}", [*self.spec.cmd, *flags], self.spec.env, REPO_DIR,
                                   LOGS_DIR / f"server-replicas-{label}.log", cpus)

    def first(self, body: bytes) -> float:
        seconds, _ = procs.wait_first_prediction(self.server, self.url + "/infer", body, 180, self.spec.headers)
        return seconds

    def meta(self) -> dict[str, Any]:
        req = urllib.request.Request(self.url, headers=self.spec.headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def replicas(self) -> list[dict[str, Any]]:
        return [r for r in self.meta().get("replicas", []) if r["state"] in ("idle", "busy")]

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        procs.stop(self.server)


def point(s: Served, w: Workload, c: int, duration: int, cpus: str) -> dict[str, Any]:
    p = wrk(s.url + "/infer", w.body_path, c, duration, s.spec.headers, cpus)
    log(f"  c={c}: {p.ok_rps:,.0f} req/s, p50 {p.p50_ms:.3f} ms, p99 {p.p99_ms:.2f} ms, non-2xx {p.non2xx}")
    return dict(p.to_json())


def b_scale(w: Workload, duration: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (1, 2):
        log(f"B, process, {n} replica(s), server and wrk on cores {BOTH}")
        with Served(w.model_name, ["--isolation", "process", "--replicas", str(n)], BOTH, f"b{n}") as s:
            s.first(w.body_path.read_bytes())
            wrk(s.url + "/infer", w.body_path, 8, 2, s.spec.headers, BOTH)  # warm-up
            out[f"replicas_{n}"] = point(s, w, 64, duration, BOTH)
    out["ratio"] = out["replicas_2"]["ok_rps"] / max(out["replicas_1"]["ok_rps"], 1e-9)
    log(f"B 2 replicas / 1 at c=64: {out['ratio']:.2f}x (target >= 1.6)")
    return out


def a_iso(w: Workload, duration: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for iso in ("thread", "process"):
        log(f"A, --isolation {iso}, server on core {SERVER_CPU}, wrk on core {LOADGEN_CPU}")
        with Served(w.model_name, ["--isolation", iso], SERVER_CPU, f"a-{iso}") as s:
            s.first(w.body_path.read_bytes())
            wrk(s.url + "/infer", w.body_path, 8, 2, s.spec.headers, LOADGEN_CPU)
            out[iso] = {c: point(s, w, c, duration, LOADGEN_CPU) for c in (1, 64)}
    out["ratio_c64"] = out["process"][64]["ok_rps"] / max(out["thread"][64]["ok_rps"], 1e-9)
    out["p50_delta_ms_c1"] = out["process"][1]["p50_ms"] - out["thread"][1]["p50_ms"]
    log(f"A process/thread at c=64: {out['ratio_c64']:.2f}x (target >= 0.80); "
        f"c=1 p50 +{out['p50_delta_ms_c1']:.3f} ms (target <= 0.2)")
    return out


def scale_out(w: Workload, duration: int) -> dict[str, Any]:
    flags = ["--isolation", "process", "--replicas", "1:2", "--target-inflight", "1", "--upscale-delay-s", "0",
             "--downscale-delay-s", "600"]
    with Served(w.model_name, flags, BOTH, "scale-out") as s:
        s.first(w.body_path.read_bytes())
        cmd = loadgen.wrk_command(s.url + "/infer", 64, max(duration, 10))
        cmd[2] = BOTH
        env = {**os.environ, "BENCH_BODY_FILE": str(w.body_path),
               "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in s.spec.headers.items())}
        t0 = time.perf_counter()
        load = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        taken: float | None = None
        started: float | None = None
        try:
            while time.perf_counter() - t0 < 60:
                reps = s.meta().get("replicas", [])
                if started is None and len(reps) >= 2:
                    started = time.perf_counter() - t0
                if sum(1 for r in reps if r["batches"] > 0) >= 2:
                    taken = time.perf_counter() - t0
                    break
                time.sleep(0.02)
        finally:
            load.terminate()
            load.wait(30)
    log(f"scale-out 1 -> 2 under a step to c=64: second replica started after {started}s, "
        f"took traffic after {taken}s")
    return {"second_started_s": started, "second_took_traffic_s": taken}


def cold(w: Workload, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for iso in ("thread", "process"):
        times = []
        for i in range(rounds):
            with Served(w.model_name, ["--isolation", iso], SERVER_CPU, f"cold-{iso}-{i}") as s:
                times.append(s.first(w.body_path.read_bytes()))
        out[iso] = {"runs_s": times, "median_s": statistics.median(times)}
    out["delta_s"] = out["process"]["median_s"] - out["thread"]["median_s"]
    log(f"cold start: thread {out['thread']['median_s']:.2f}s, process {out['process']['median_s']:.2f}s, "
        f"+{out['delta_s']:.2f}s (target <= 0.3)")
    return out


def onnx_weights(path: Path, mb: int) -> Path:
    """An ONNX model y = x @ W (W float32, ``mb`` MB), made with the onnx helper; its request body."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = int((mb * 1e6 / 4) ** 0.5)
    w = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) * 0.01
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "big.onnx"))
    np.save(path / "sample.npy", np.zeros((1, n), np.float32))
    (path / "body.json").write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, n], "datatype": "FP32",
                                                            "data": [0.0] * n}]}))
    return path


def pss(mb: int) -> dict[str, Any]:
    """Both ONNX pods: the default (in replicas one intra-op thread, no pool: the template keeps it
    loaded and the replicas share its pages) and ``threads=0`` (ONNX Runtime's pool: each replica
    loads its own)."""
    d = onnx_weights(WORK_DIR / "replicas-onnx", mb)
    body = (d / "body.json").read_bytes()
    out: dict[str, Any] = {}
    for name, extra in (("bigonnx", []), ("bigonnx0", ["--option", "threads=0"])):
        modelpod.pack_file(d / "big.onnx", name, ["--sample", str(d / "sample.npy"), *extra])
        row: dict[str, Any] = {}
        for n in (1, 2):
            with Served(name, ["--isolation", "process", "--replicas", str(n)], BOTH, f"pss-{name}-{n}") as s:
                s.first(body)
                deadline = time.perf_counter() + 60
                while time.perf_counter() < deadline and sum(1 for r in s.replicas() if r["batches"]) < n:
                    procs.post_json(s.url + "/infer", body, 30, s.spec.headers)
                row[f"replicas_{n}"] = procs.tree_memory(s.server)
        row["ratio"] = row["replicas_2"]["pss_mb"] / max(row["replicas_1"]["pss_mb"], 1e-9)
        log(f"PSS of {mb} MB ONNX ({name}): 1 replica {row['replicas_1']['pss_mb']:.0f} MB, 2 replicas "
            f"{row['replicas_2']['pss_mb']:.0f} MB: {row['ratio']:.2f}x (target <= 1.3)")
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s points, one cold start, 20 MB ONNX")
    p.add_argument("--duration", type=int, help="seconds per wrk point (default 10; 2 quick)")
    p.add_argument("--models-python", type=Path, help="a Python with scikit-learn, skops and torch to make the "
                   "models with (default: run.py's workloads venv)")
    p.add_argument("--only", help=f"comma-separated rows: {','.join(ROWS)} (default: all)")
    args = p.parse_args(argv)
    duration = args.duration or (2 if args.quick else 10)
    rows = [r for r in (args.only.split(",") if args.only else ROWS) if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    python = args.models_python or venvs.ensure(WORKLOADS_ENV, 1800)
    workloads = make_models(python)
    modelpod.check_available()
    modelpod.reset_home()
    for key in ("A", "B"):
        w = workloads[key]
        modelpod.pack_file(w.modelpod_file, w.model_name, ["--sample", str(w.sample_path)])
    results: dict[str, Any] = {"duration_s": duration}
    for row in rows:
        if row == "b-scale":
            results[row] = b_scale(workloads["B"], duration)
        elif row == "a-iso":
            results[row] = a_iso(workloads["A"], duration)
        elif row == "scale-out":
            results[row] = scale_out(workloads["B"], duration)
        elif row == "cold":
            results[row] = cold(workloads["A"], 1 if args.quick else 3)
        elif row == "pss":
            results[row] = pss(20 if args.quick else 200)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
