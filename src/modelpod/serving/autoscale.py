"""Autoscaler: how many replicas a model version wants, from its in-flight batches per replica.

Demand is the batches running in replicas, plus the batches held for a free replica, plus the
batches the batcher's queued rows would make. The wanted count is ``ceil(demand /
target_inflight)`` within ``min``..``max``. A change waits: up only once demand has wanted more for
``upscale_delay_s``, down only once it has wanted fewer for ``downscale_delay_s`` (longer, so a dip
between bursts does not drop a warm replica). From zero replicas any demand scales up at once: a
request is held until a replica is up, never refused. The clock is injected (tests use a fake one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelpod.serving.scaling import ReplicaPolicy


@dataclass(frozen=True)
class Decision:
    """One change of the replica target, for the log and ``modelpod_scale_events_total``."""

    before: int
    after: int
    demand: float

    @property
    def direction(self) -> str:
        return "up" if self.after > self.before else "down"


class Autoscaler:
    def __init__(self, policy: ReplicaPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._up_since: float | None = None
        self._down_since: float | None = None

    def wanted(self, demand: float) -> int:
        """The replicas ``demand`` asks for, within min..max, ignoring the delays."""
        p = self.policy
        want = math.ceil(demand / p.target_inflight - 1e-9) if demand > 0 else 0
        return max(p.min, min(p.max, want))

    def decide(self, current: int, demand: float) -> Decision | None:
        """The new target when it should change now; None to keep ``current``."""
        p = self.policy
        now = self.clock()
        want = self.wanted(demand)
        if current < p.min or current > p.max:  # a changed policy, or the start: no delay
            return self._to(current, max(p.min, min(p.max, current)), demand)
        if current == 0 and demand > 0:
            return self._to(current, max(1, want), demand)
        if want > current:
            self._down_since = None
            if self._up_since is None:
                self._up_since = now
            if now - self._up_since >= p.upscale_delay_s:
                return self._to(current, want, demand)
            return None
        if want < current:
            self._up_since = None
            if self._down_since is None:
                self._down_since = now
            if now - self._down_since >= p.downscale_delay_s:
                return self._to(current, want, demand)
            return None
        self._up_since = self._down_since = None
        return None

    def _to(self, current: int, after: int, demand: float) -> Decision | None:
        self._up_since = self._down_since = None
        return Decision(current, after, demand) if after != current else None


def demand_of(running: int, held: int, queued_rows: int, max_batch_rows: int) -> float:
    """In-flight batches of a model: running + held + what the queued rows would make."""
    queued = math.ceil(queued_rows / max(1, max_batch_rows)) if queued_rows > 0 else 0
    return float(running + held + queued)
