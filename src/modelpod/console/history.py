"""The console's history: a periodic task reads the server's own metrics into a ring of time points.

Nothing here runs per request. Once every ``interval_s`` the sampler reads the counters and
histograms the hot path already updates (``ServingMetrics``) and the registry's queue gauges, and
turns the differences since its last reading into one point per series: requests and errors per
second, latency p50/p99 (interpolated inside the histogram buckets, as Prometheus'
``histogram_quantile`` does), mean rows per batch, queue depth and requests in flight. A series is
one model version answering directly, or one route's variant. A freshly opened page reads the ring
and shows the last minutes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpod.serving.engine import InferenceEngine

log = logging.getLogger("modelpod.console")

INTERVAL_S = 1.0
POINTS = 600  # ten minutes at the default interval
EVENTS = 200
SeriesKey = tuple[str, str, str, str]  # model, version, route, variant


def bucket_quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of observations counted per bucket (``counts`` has one more entry
    than ``bounds``: the +Inf bucket), interpolated linearly inside its bucket; None when empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if n > 0 and running + n >= rank:
            if i >= len(bounds):  # the +Inf bucket: its lower bound is all that is known
                return float(bounds[-1]) if bounds else None
            low = float(bounds[i - 1]) if i > 0 else 0.0
            return low + (float(bounds[i]) - low) * max(0.0, rank - running) / n
        running += n
    return float(bounds[-1]) if bounds else None


def series_id(key: SeriesKey) -> str:
    model, version, route, variant = key
    if route:
        return f"{route}/{variant}"
    return f"{model}:{version}" if version else model


class History:
    """The ring of sampled points; ``sample()`` takes one (the periodic task calls it)."""

    def __init__(self, engine: InferenceEngine, *, interval_s: float = INTERVAL_S, points: int = POINTS,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.clock = clock
        self.points: deque[dict[str, Any]] = deque(maxlen=points)
        self.series: dict[str, dict[str, str]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)  # answers that were not successes
        self._last = clock()
        self._latency: dict[tuple[str, ...], list[int]] = {}
        self._batches: dict[tuple[str, ...], tuple[int, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self.sample(record=False)  # the baseline: the first point counts what came after the start

    # -- the periodic task ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:  # a bug here must not end the sampling (nor reach the server)
                log.exception("console sampling failed")

    # -- reading ----------------------------------------------------------------------------------
    def since(self, t: float) -> list[dict[str, Any]]:
        """The points taken after time ``t`` (seconds since the epoch), oldest first."""
        return [p for p in self.points if p["t"] > t]

    def sample(self, *, record: bool = True) -> dict[str, Any]:
        """Read the metrics once; append (and return) the point of the interval since the last reading."""
        now = self.clock()
        dt = max(now - self._last, 1e-6)
        self._last = now
        metrics = self.engine.metrics
        per: dict[SeriesKey, dict[str, Any]] = {}
        # Every model version shows, answering or not; routed variants once they have answered.
        for entry in self.engine.registry:
            per[(entry.name, entry.version_text, "", "")] = _empty()
        bounds = metrics.latency.bounds
        for key, child in list(metrics.latency.children.items()):
            model, version, route, variant, outcome = key
            before = self._latency.get(key)
            counts = list(child.counts)
            self._latency[key] = counts
            if before is None or sum(before) > sum(counts):  # new (or reset): all of it is new
                before = [0] * len(counts)
            delta = [a - b for a, b in zip(counts, before, strict=True)]
            n = sum(delta)
            row = per.setdefault((model, version, route, variant), _empty())
            row["requests"] += n
            if outcome == "success":
                row["_ok"] = [a + b for a, b in zip(row["_ok"], delta, strict=False)] if row["_ok"] else delta
            elif n:
                row["errors"] += n
                if record:
                    self.events.append({"t": round(now, 3), "kind": "answers", "level": "warning",
                                        "series": series_id((model, version, route, variant)), "outcome": outcome,
                                        "count": n, "message": f"{n} {outcome.replace('_', ' ')} answer(s)"})
        batch = self._batch_rows(metrics, dt)
        gauges = {(e.name, e.version_text): (e.batcher.queue_depth if e.batcher is not None else 0,
                                             e.batcher.inflight if e.batcher is not None else 0)
                  for e in self.engine.registry}
        out: dict[str, dict[str, Any]] = {}
        for key, row in per.items():
            sid = series_id(key)
            self.series.setdefault(sid, {"model": key[0], "version": key[1], "route": key[2], "variant": key[3]})
            ok = row["_ok"] or []
            queue, inflight = gauges.get((key[0], key[1]), (0, 0))
            rows_per_batch, batches_per_s = batch.get((key[0], key[1]), (None, 0.0))
            out[sid] = {
                "requests_per_s": row["requests"] / dt, "errors_per_s": row["errors"] / dt,
                "latency_p50_s": bucket_quantile(bounds, ok, 0.5), "latency_p99_s": bucket_quantile(bounds, ok, 0.99),
                "batch_rows": rows_per_batch, "batches_per_s": batches_per_s,
                "queue_depth": queue, "inflight": inflight,
            }
        point = {"t": round(now, 3), "series": out}
        if record:
            self.points.append(point)
        return point

    def _batch_rows(self, metrics: Any, dt: float) -> dict[tuple[str, ...], tuple[float | None, float]]:
        """Per model version: mean rows per batch run in the interval, and batches per second."""
        out: dict[tuple[str, ...], tuple[float | None, float]] = {}
        for key, child in list(metrics.batch_rows.children.items()):
            count, total = child.count, child.sum
            before = self._batches.get(key, (0, 0.0))
            self._batches[key] = (count, total)
            if before[0] > count:
                before = (0, 0.0)
            n = count - before[0]
            out[key] = ((total - before[1]) / n if n else None, n / dt)
        return out


def _empty() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "_ok": None}
