"""Interleavable A/B rounds for `modelpod batch` on a noisy machine: CPU seconds beside job seconds.

    PYTHONPATH=A/src python batch_ab.py resume IN.parquet OUT.parquet ROUNDS BATCH_ROWS
    PYTHONPATH=A/src python batch_ab.py floor IN.parquet ROUNDS

Run it with one checkout's `src` then the other's, alternating (MODELPOD_HOME holding `bench-a`).
``resume``: a full run, a run stopped once half its parts are committed, then the resumed run; the
rest / full ratios by the job's seconds and by CPU. ``floor``: `batch_tool.read_predict_write`
against `modelpod.batch.run`, interleaved in one process. JSON on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_tool import read_predict_write

from modelpod.batch.api import load_model, run


class Stop(Exception):
    pass


def stopper(parts: int) -> Any:
    """An event hook that stops a run once ``parts`` parts are committed."""
    seen: list[int] = []

    def stop(event: dict[str, Any]) -> None:
        if event["event"] == "part":
            seen.append(1)
            if len(seen) >= parts:
                raise Stop

    return stop


def resume(model: Any, digest: str, src: str, out: str, rounds: int, batch: int) -> list[dict[str, Any]]:
    results = []
    for _ in range(rounds):
        c = time.process_time()
        full = run("bench-a", src, out, model=model, digest=digest, keep_columns="id", batch_rows=batch,
                   overwrite=True)
        full_cpu = time.process_time() - c
        Path(out).unlink()
        with contextlib.suppress(Stop):
            run("bench-a", src, out, model=model, digest=digest, keep_columns="id", batch_rows=batch,
                overwrite=True, on_event=stopper(full.parts // 2))
        c = time.process_time()
        rest = run("bench-a", src, out, model=model, digest=digest, keep_columns="id", batch_rows=batch)
        rest_cpu = time.process_time() - c
        results.append({"full_s": full.seconds, "rest_s": rest.seconds, "ratio": round(rest.seconds / full.seconds, 3),
                        "full_cpu": round(full_cpu, 3), "rest_cpu": round(rest_cpu, 3),
                        "cpu_ratio": round(rest_cpu / full_cpu, 3), "resumed": rest.resumed_parts,
                        "parts": full.parts})
    return results


def floor(model: Any, digest: str, src: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {"floor": [], "modelpod_65536": [], "modelpod_default": []}
    work = Path(src).with_name("ab-out.parquet")
    for _ in range(rounds):
        c, t = time.process_time(), time.perf_counter()
        read_predict_write(model, Path(src), 65536, work)
        out["floor"].append((round(time.perf_counter() - t, 3), round(time.process_time() - c, 3)))
        for key, batch in (("modelpod_65536", 65536), ("modelpod_default", None)):
            c = time.process_time()
            s = run("bench-a", src, work, model=model, digest=digest, keep_columns="id", batch_rows=batch,
                    overwrite=True)
            out[key].append((s.seconds, round(time.process_time() - c, 3)))
    work.unlink(missing_ok=True)
    return out


def main(argv: list[str]) -> int:
    model, digest = load_model("bench-a")
    if argv[:1] == ["resume"]:
        print(json.dumps(resume(model, digest, argv[1], argv[2], int(argv[3]), int(argv[4]))))
        return 0
    if argv[:1] == ["floor"]:
        print(json.dumps(floor(model, digest, argv[1], int(argv[2]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
