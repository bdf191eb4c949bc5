"""Shadow copies: each answered request of a route, run again on its shadows, after the answer.

The primary answer is already on its way when a copy is sent, and a copy is dropped instead of
queued whenever its shadow has ``SHADOW_QUEUE`` copies in flight or the primary's own queue is
half full: under load, shadow copies go first. A shadow's errors, slowness and overload are counted
(``modelpod_shadow_requests_total{outcome}``) and never reach the caller. Each answer is compared
with the primary's: ``modelpod_shadow_agreement`` is the share of copies that agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from modelpod.errors import ModelNotReadyError, ModelpodError
from modelpod.model import Batch
from modelpod.serving.metrics import outcome_of
from modelpod.serving.registry import ModelRegistry, ModelState

if TYPE_CHECKING:
    from modelpod.serving.traffic import Route, Variant

log = logging.getLogger("modelpod.serving")
SHADOW_QUEUE = 64


def agree(primary: Batch, shadow: Batch, tolerance: float) -> bool:
    """Whether two answers agree: every output both have is equal, where scores (2-D floats with
    several columns) need only the same argmax per row and other numbers need only be within
    ``tolerance`` (absolute and relative)."""
    common = [n for n in primary if n in shadow]
    if not common:
        return False
    for name in common:
        a, b = np.asarray(primary[name]), np.asarray(shadow[name])
        if a.shape != b.shape:
            return False
        if a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] > 1 and b.dtype.kind in "fiu":
            if not np.array_equal(a.argmax(axis=1), b.argmax(axis=1)):
                return False
        elif a.dtype.kind in "fiub" and b.dtype.kind in "fiub":
            if not np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=tolerance, atol=tolerance):
                return False
        elif not np.array_equal(a, b):
            return False
    return True


class ShadowSender:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, route: Route, primary: Variant, inputs: Batch, outputs: Batch) -> None:
        """Start one copy per shadow, or count it dropped; never raises."""
        batcher = primary.entry.batcher
        pressed = batcher is not None and batcher.queue_depth * 2 >= max(1, primary.entry.policy.max_queue)
        for shadow in route.shadows:
            busy = route.shadow_inflight.get(shadow.name, 0)
            if pressed or busy >= SHADOW_QUEUE or not shadow.entry.available:
                shadow.stats.shadow_dropped += 1
                continue
            route.shadow_inflight[shadow.name] = busy + 1
            task = asyncio.get_running_loop().create_task(self._run(route, shadow, inputs, outputs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, route: Route, shadow: Variant, inputs: Batch, primary: Batch) -> None:
        t0 = time.perf_counter()
        stats = shadow.stats
        try:
            entry = shadow.entry
            if entry.state is not ModelState.READY:
                await self.registry.ensure_ready(entry)
            model, batcher = entry.model, entry.batcher
            if model is None or batcher is None:
                raise ModelNotReadyError(f"shadow {shadow.name} is not ready")
            out = await batcher.submit(model.coerce(inputs))
        except Exception as exc:
            seconds = time.perf_counter() - t0
            outcome = outcome_of(exc) if isinstance(exc, ModelpodError) else "error"
            shadow.metrics.observe_request("shadow", outcome, seconds)
            stats.shadow_errors += 1
            stats.observe(False, seconds)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("shadow copy failed", extra={"fields": {"route": route.spec.name, "shadow": shadow.name,
                                                                  "error": f"{type(exc).__name__}: {exc}"}})
        else:
            seconds = time.perf_counter() - t0
            shadow.metrics.observe_request("shadow", "success", seconds)
            stats.observe(True, seconds)
            stats.shadow_compared += 1
            try:
                same = agree(primary, out, route.spec.shadow_tolerance)
            except Exception:  # outputs that do not compare (odd dtypes) count as disagreeing
                same = False
            if same:
                stats.shadow_agreed += 1
        finally:
            route.shadow_inflight[shadow.name] = route.shadow_inflight.get(shadow.name, 1) - 1

    async def wait(self) -> None:
        """Wait for the copies in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def pending(self) -> int:
        return len(self._tasks)
