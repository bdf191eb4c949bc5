"""A model served with ``isolation: process`` or ``thread`` in-process, no HTTP: a bounded request loop.

What the server does for one request between the protocol and the model (decode, the engine, the
batcher, and for ``process`` the hand-off to the replica and back), for a pod in ``$MODELPOD_HOME``.
After a warm-up it runs ``N1`` requests, then ``N2`` more, from ``C`` concurrent clients, and prints
for each phase its wall time, the server's and the replicas' CPU seconds, and the latency p50.

Under callgrind (``--callgrind``; run the whole command under ``valgrind --tool=callgrind
--trace-children=yes --instr-atstart=no --trace-children-skip='*perl*,*callgrind_control*'``) counting
is switched on after the warm-up, for this process and its replicas, and each phase is dumped
(``callgrind_control -d``): the second dump over ``N2`` is the instructions per request on each side,
stable on a busy machine where wall time is not.

Usage: python replica_loop.py MODEL ISOLATION C N1 N2 [--replicas R] [--callgrind] [--profile] [--rows K]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modelpod.protocols.codec import decode_request
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings


def cpu_of(pid: int) -> float:
    """CPU seconds of ``pid``'s main thread (``/proc/PID/schedstat``: nanoseconds, not clock ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def control(args: list[str], pids: list[int]) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=600)


async def phase(engine: InferenceEngine, name: str, body: dict[str, Any], conc: int, n: int) -> list[float]:
    check = engine.input_check(name, None)
    lat: list[float] = []
    counts = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]

    async def client(k: int) -> None:
        for _ in range(k):
            t0 = time.perf_counter()
            await engine.infer(name, None, decode_request(body, None, check))
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(k) for k in counts if k))
    return lat


async def main(args: argparse.Namespace) -> None:
    settings = Settings(home=Path(os.environ.get("MODELPOD_HOME", Settings().home)))
    model = {"isolation": args.isolation, "max_batch_rows": 32, "max_batch_wait_ms": 5}
    if args.isolation == "process":
        model["replicas"] = args.replicas
    engine = InferenceEngine(settings, ServeConfig.from_settings(settings, {"models": {args.model: model}}))
    engine.add(args.model)
    await engine.start()
    try:
        meta = engine.model_metadata(args.model)
        spec = meta["inputs"][0]
        width = [d for d in spec["shape"][1:]] or []
        width = [d if d > 0 else 1 for d in width]
        per = 1
        for d in width:
            per *= d
        body = {"inputs": [{"name": spec["name"], "datatype": spec["datatype"], "shape": [args.rows, *width],
                            "data": [0.25] * (per * args.rows)}]}
        rs = engine.resolve(args.model).replicas
        children = [r["pid"] for r in rs.describe()] if rs is not None else []
        await phase(engine, args.model, body, args.c, 300)
        if args.callgrind:
            control(["-i", "on"], [os.getpid(), *children])
        report: dict[str, Any] = {"isolation": args.isolation, "c": args.c, "replicas": children}
        hist = engine.resolve(args.model).metrics.batch_rows
        for label, n in (("n1", args.n1), ("n2", args.n2)):
            batches0 = hist.count
            cpu0 = time.process_time(), sum(cpu_of(p) for p in children)
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            prof = cProfile.Profile() if args.profile and label == "n2" else None
            t0 = time.perf_counter()
            if prof is not None:
                prof.enable()
            lat = await phase(engine, args.model, body, args.c, n)
            if prof is not None:
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(40)
            wall = time.perf_counter() - t0
            cpu1 = time.process_time(), sum(cpu_of(p) for p in children)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            if args.callgrind:
                control(["-d"], [os.getpid(), *children])
            report[label] = {"n": n, "batches": hist.count - batches0, "wall_s": round(wall, 4),
                             "rps": round(n / wall, 1),
                             "server_cpu_us": round((cpu1[0] - cpu0[0]) / n * 1e6, 2),
                             "server_sys_us": round((ru1.ru_stime - ru0.ru_stime) / n * 1e6, 2),
                             "server_csw": round((ru1.ru_nvcsw + ru1.ru_nivcsw - ru0.ru_nvcsw - ru0.ru_nivcsw) / n, 2),
                             "replica_cpu_us": round((cpu1[1] - cpu0[1]) / n * 1e6, 2),
                             "p50_ms": round(statistics.median(lat) * 1e3, 4)}
        print(json.dumps(report), flush=True)
    finally:
        await engine.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("isolation", choices=("thread", "process"))
    p.add_argument("c", type=int)
    p.add_argument("n1", type=int)
    p.add_argument("n2", type=int)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--callgrind", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile's table of the second phase (stderr)")
    import uvloop

    uvloop.run(main(p.parse_args()))
