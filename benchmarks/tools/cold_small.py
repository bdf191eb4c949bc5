"""The ONNX small pod's cold start against its framework floor, in interleaved rounds (issue 17).

Usage: .venv/bin/python benchmarks/tools/cold_small.py [--rounds N] [--baseline REV] [--models-python PY]

Each round runs, in turn, the floor (``bench/floors.py``: ``python -c`` importing onnxruntime,
creating the session and running it once), modelpod's small pod (``run.py``'s ``bench_small_pod``:
``modelpod serve logreg-onnx``, launch to the first answered request), and with ``--baseline`` the
same pod served by REV's sources; each is the median of its ``COLD_STARTS`` launches, as in
``run.py``. Prints every round, then the medians over the rounds minus the floor's (the line
``cold start - framework floor, ONNX small pod`` of run.py's Issue 17 block is one such round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run
from bench import floors, modelpod, venvs
from bench.config import LOGS_DIR, RUNTIME_DIR, WORKLOADS_ENV
from bench.workloads import make_models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--baseline", metavar="REV", help="also serve the pod with REV's sources")
    p.add_argument("--models-python", type=Path, help="a Python with scikit-learn, skops, skl2onnx and torch "
                   "to make the models with (default: run.py's workloads venv)")
    args = p.parse_args(argv)
    for folder in (LOGS_DIR, RUNTIME_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    workload = make_models(args.models_python or venvs.ensure(WORKLOADS_ENV, 1800))["A"]
    opts = run.parse_args(["--quick", "--workloads", "A"])
    baseline = modelpod.baseline_sources(args.baseline) if args.baseline else None
    for src in (None, baseline) if baseline is not None else (None,):
        modelpod.set_baseline(src)
        modelpod.check_available()
        modelpod.reset_home()
    modelpod.set_baseline(None)
    labels = ["floor", "modelpod", *([f"modelpod@{args.baseline}"] if baseline is not None else [])]
    runs: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(args.rounds):
        floor = floors.framework_cold_start(workload, floors.ONNX_FLOOR)
        if floor.get("status") != "ok":
            print(f"floor: {floor}")
            return 1
        runs["floor"].append(floor["cold_start_s"])
        for label, src in (("modelpod", None), (f"modelpod@{args.baseline}", baseline)):
            if label not in runs:
                continue
            modelpod.set_baseline(src)
            try:
                small = run.bench_small_pod(workload, opts)
            finally:
                modelpod.set_baseline(None)
            if small.get("status") != "ok":
                print(f"{label}: {small}")
                return 1
            runs[label].append(small["cold_start_s"])
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in runs.items()), flush=True)
    floor_s = statistics.median(runs["floor"])
    for label, values in runs.items():
        over = "" if label == "floor" else f", {statistics.median(values) - floor_s:+.3f} s over the floor"
        print(f"{label}: median {statistics.median(values):.3f} s{over} (rounds: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
