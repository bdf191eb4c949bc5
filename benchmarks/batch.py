"""Batch benchmark: `modelpod batch` on workload A, Parquet -> Parquet, next to the model's own
in-process rate and Ray Data `map_batches`; peak memory against input size; resume overhead.

Usage: .venv/bin/python benchmarks/batch.py [--quick] [--no-ray] [--rows N] [--rss-rows A,B]

Targets (issue 14): end to end >= 90 % of the in-process rows/s at the model's best batch size and
>= 2x Ray Data on the same file; peak RSS for 10 M rows <= peak RSS for 100 k rows + 100 MB; a run
killed at 50 % and resumed takes <= 55 % of a full run's time for the rest. Everything runs on one
core (taskset -c 0), one worker thread, the same batch size for every contender. Files and the
results (`batch-results.json`) go under benchmarks/.work/batch/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import venvs
from bench.config import MODELS_DIR, SERVER_CPU, SKLEARN_SPEC, TOOLS_DIR, WORK_DIR, WORKLOADS_ENV, EnvSpec
from bench.modelpod import VENV
from bench.peers import base_env
from bench.workloads import make_models

OUT = WORK_DIR / "batch"
HOME = OUT / "home"
RAY_DATA_ENV = EnvSpec("raydata", False, (SKLEARN_SPEC, "joblib", "ray[data]==2.60.0", "pyarrow"))
POD = "bench-a"


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.stdout.strip().splitlines()[-1]))


def log(message: str) -> None:
    print(f"[batch-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", SERVER_CPU, *cmd] if shutil.which("taskset") else cmd


def measured(cmd: list[str], env: dict[str, str], timeout_s: float = 3600) -> Run:
    """Run a command to its end; wall time and the peak RSS of that process (wait4's rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # communicate() would reap the child; read its pipes on threads and reap it with wait4 ourselves.
    import threading

    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: chunks.__setitem__(k, s.read()))  # type: ignore[misc]
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, usage.ru_maxrss / 1024, proc.returncode, chunks.get("out", b"").decode(),
               chunks.get("err", b"").decode())


def modelpod_env() -> dict[str, str]:
    return base_env(VENV, {"MODELPOD_HOME": str(HOME), "PYTHONPATH": str(Path(__file__).resolve().parent.parent
                                                                               / "src")})


def python() -> str:
    return str(VENV / "bin" / "python")


def batch_cmd(src: Path, out: Path, batch_rows: int | None) -> list[str]:
    """``batch_rows`` None: modelpod's default batch size."""
    size = ["--batch-rows", str(batch_rows)] if batch_rows else []
    return pinned([python(), "-m", "modelpod", "batch", POD, "--input", str(src), "--output", str(out),
                   "--keep-columns", "id", *size, "--json"])


def prepare(rows: int, rss_rows: list[int], models_python: str | None) -> dict[str, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    log("workload A's model")
    make_models(Path(models_python) if models_python else venvs.ensure(WORKLOADS_ENV, 3600))
    if HOME.exists():
        shutil.rmtree(HOME)
    env = modelpod_env()
    a = MODELS_DIR / "A"
    subprocess.run([python(), "-m", "modelpod", "pack", str(a / "model.skops"), "--name", POD, "--sample",
                    str(a / "sample.npy"), "--json"], env=env, check=True, capture_output=True, timeout=600)
    files = {}
    for n in sorted({rows, *rss_rows}):
        path = OUT / f"a-{n}.parquet"
        if not path.exists():
            log(f"writing {n:,} rows to {path.name}")
            subprocess.run([python(), str(TOOLS_DIR / "batch_tool.py"), "data", str(n), str(path)], env=env,
                           check=True, timeout=3600)
        files[str(n)] = path
    return files


def journal_lines(parts: Path) -> int:
    try:
        return (parts / "journal.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def resume_overhead(src: Path, rows: int, batch_rows: int | None, full_s: float) -> dict[str, Any]:
    """Kill -9 once half the parts are committed, then time the resumed run for the rest."""
    out = OUT / f"resume-{rows}.parquet"
    parts = OUT / f"resume-{rows}.parquet.parts"
    for p in (out, parts):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    total_parts = -(-rows // 65536)
    proc = subprocess.Popen(batch_cmd(src, out, batch_rows), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=modelpod_env())
    while proc.poll() is None and journal_lines(parts) < total_parts // 2:
        time.sleep(0.005)
    killed_at = journal_lines(parts)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = measured(batch_cmd(src, out, batch_rows), modelpod_env())
    summary = rest.summary()
    out.unlink(missing_ok=True)
    return {"rows": rows, "killed_after_parts": killed_at, "parts": total_parts, "rest_run_s": summary["seconds"],
            "rest_wall_s": rest.wall_s, "full_run_s": full_s, "ratio": summary["seconds"] / full_s,
            "resumed_rows": summary["resumed_rows"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="200 k rows, RSS at 100 k and 1 M rows")
    p.add_argument("--no-ray", action="store_true", help="skip Ray Data (no venv install)")
    p.add_argument("--rows", type=int, help="rows of the main file (default 1,000,000)")
    p.add_argument("--rss-rows", help="comma list of input sizes for peak RSS (default 100000,10000000)")
    p.add_argument("--models-python", help="make the models with this python instead of the workloads venv")
    args = p.parse_args(argv)
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    rss_rows = [int(v) for v in (args.rss_rows or ("100000,1000000" if args.quick else "100000,10000000")).split(",")]
    files = prepare(rows, rss_rows, args.models_python)
    src = files[str(rows)]
    env = modelpod_env()
    results: dict[str, Any] = {"rows": rows}

    log("in-process predict, per batch size")
    proc = subprocess.run(pinned([python(), str(TOOLS_DIR / "batch_tool.py"), "inprocess", str(HOME), POD,
                                  str(src), str(OUT / "floor.parquet")]), env=env, capture_output=True, text=True,
                          check=True, timeout=3600)
    inproc = json.loads(proc.stdout.strip().splitlines()[-1])
    best = int(inproc["best_batch"])
    results["inprocess"] = inproc

    log(f"modelpod batch, batch rows {best}")
    out = OUT / "out.parquet"
    run = measured(batch_cmd(src, out, best) + ["--overwrite"], env)
    if run.returncode != 0:
        raise SystemExit(f"modelpod batch failed: {run.stderr[-2000:]}")
    summary = run.summary()
    results["modelpod"] = {"run_s": summary["seconds"], "wall_s": run.wall_s, "rows_per_s": rows / summary["seconds"],
                           "wall_rows_per_s": rows / run.wall_s, "peak_rss_mb": run.peak_rss_mb}
    log("modelpod batch, its default batch rows")
    run = measured(batch_cmd(src, out, None) + ["--overwrite"], env)
    if run.returncode != 0:
        raise SystemExit(f"modelpod batch failed: {run.stderr[-2000:]}")
    results["modelpod_default"] = {"run_s": run.summary()["seconds"], "rows_per_s": rows / run.summary()["seconds"]}

    if not args.no_ray:
        log("Ray Data map_batches (its own venv)")
        ray_python = venvs.ensure(RAY_DATA_ENV, 3600)
        ray_out = OUT / "ray-out"
        shutil.rmtree(ray_out, ignore_errors=True)
        ray = measured(pinned([str(ray_python), str(TOOLS_DIR / "ray_batch.py"), str(MODELS_DIR / "A" / "model.joblib"),
                               str(src), str(ray_out), str(best)]), base_env(RAY_DATA_ENV.path, {}))
        if ray.returncode == 0:
            results["ray"] = {**ray.summary(), "wall_s": ray.wall_s, "peak_rss_mb": ray.peak_rss_mb}
        else:
            results["ray"] = {"failed": ray.stderr.strip().splitlines()[-1:] or ["exit " + str(ray.returncode)]}

    log("peak RSS against input size")
    rss: dict[str, float] = {}
    full_s = {str(rows): float(summary["seconds"])}
    for n in rss_rows:
        r = measured(batch_cmd(files[str(n)], OUT / f"rss-{n}.parquet", best) + ["--overwrite"], env)
        rss[str(n)] = r.peak_rss_mb
        full_s[str(n)] = float(r.summary()["seconds"])
        (OUT / f"rss-{n}.parquet").unlink(missing_ok=True)
    results["peak_rss_mb"] = rss

    log("resume after kill -9 at 50 %, on the main file and on the largest")
    results["resume"] = [resume_overhead(files[str(n)], n, best, full_s[str(n)])
                         for n in sorted({rows, max(rss_rows)})]

    (OUT / "batch-results.json").write_text(json.dumps(results, indent=2))
    report(results, rss_rows)
    return 0


def report(r: dict[str, Any], rss_rows: list[int]) -> None:
    m, ip = r["modelpod"], r["inprocess"]
    print(f"\nworkload A, {r['rows']:,} rows Parquet -> Parquet, one core, batch {ip['best_batch']}")
    print(f"  in-process predict (best batch)   {ip['best_rows_per_s']:>12,.0f} rows/s")
    print(f"  in-process read + predict         {ip['read_and_predict_rows_per_s']:>12,.0f} rows/s")
    floor = ip["read_predict_write_rows_per_s"]
    print(f"  in-process read + predict + write {floor:>12,.0f} rows/s  (the floor of a file job)")
    print(f"  modelpod batch                    {m['rows_per_s']:>12,.0f} rows/s  (wall incl. start-up "
          f"{m['wall_rows_per_s']:,.0f})")
    print(f"    / in-process predict   {m['rows_per_s'] / ip['best_rows_per_s']:.2f}  (issue 14's target >= 0.90)")
    print(f"    / read + predict + write {m['rows_per_s'] / floor:.2f}  (>= 0.90 of the floor)")
    d = r["modelpod_default"]
    print(f"  modelpod batch, default batch rows {d['rows_per_s']:>11,.0f} rows/s  "
          f"/ floor {d['rows_per_s'] / floor:.2f}")
    ray = r.get("ray")
    if ray and "rows_per_s" in ray:
        print(f"  Ray Data map_batches              {ray['rows_per_s']:>12,.0f} rows/s  "
              f"modelpod / Ray {m['rows_per_s'] / ray['rows_per_s']:.2f}  (target >= 2.0)")
    elif ray:
        print(f"  Ray Data map_batches              failed: {ray['failed']}")
    small, large = str(min(rss_rows)), str(max(rss_rows))
    delta = r["peak_rss_mb"][large] - r["peak_rss_mb"][small]
    print(f"  peak RSS {int(small):,} rows {r['peak_rss_mb'][small]:.0f} MB, {int(large):,} rows "
          f"{r['peak_rss_mb'][large]:.0f} MB: +{delta:.0f} MB  (target <= +100 MB)")
    for res in r["resume"]:
        print(f"  resume, {res['rows']:,} rows: killed after {res['killed_after_parts']}/{res['parts']} parts, the "
              f"rest took {res['rest_run_s']:.2f} s of a full run's {res['full_run_s']:.2f} s: {res['ratio']:.2f}"
              "  (target <= 0.55)")


if __name__ == "__main__":
    raise SystemExit(main())
