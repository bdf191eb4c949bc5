"""What a route measures per variant, and the statistics its report and rollouts read.

- ``VariantStats``: requests, errors, the latencies of the last ``LATENCY_WINDOW`` requests (a ring
  with absolute positions, so a rollout step can read "everything since position p"), feedback
  rewards (count, sum, sum of squares), label feedback (count, correct) and shadow comparisons.
- ``percentile``: linear interpolation between closest ranks (numpy's default).
- ``mean_ci``: the mean with a normal-approximation confidence interval.
- ``msprt_p``: the mixture sequential probability ratio test of Johari et al. ("Peeking at A/B
  tests", 2017) for a difference of two means, in its normal form; see docs/traffic.md for what
  it assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LATENCY_WINDOW = 10_000
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Moments:
    """Count, sum and sum of squares of a stream of numbers."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.squares += x * x

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """The unbiased sample variance (None below two samples)."""
        if self.n < 2:
            return None
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


def mean_ci(m: Moments, z: float = Z95) -> dict[str, Any]:
    """``{"n", "mean", "ci": [low, high]}``; the interval is mean +- z * s / sqrt(n)."""
    out: dict[str, Any] = {"n": m.n, "mean": m.mean, "ci": None}
    var = m.variance
    if var is not None and m.mean is not None:
        half = z * math.sqrt(var / m.n)
        out["ci"] = [m.mean - half, m.mean + half]
    return out


def mixture_lr(delta: float, v: float, tau2: float) -> float:
    """The mixture likelihood ratio of ``delta ~ N(theta, v)`` with ``theta ~ N(0, tau2)`` against theta = 0."""
    if v <= 0 or tau2 <= 0:
        return 1.0
    log_lr = 0.5 * math.log(v / (v + tau2)) + tau2 * delta * delta / (2.0 * v * (v + tau2))
    return math.exp(min(log_lr, 700.0))


def msprt_p(a: Moments, b: Moments, tau2: float | None = None) -> float | None:
    """One always-valid p-value reading for mean(b) - mean(a): ``min(1, 1 / Lambda)``.

    ``v`` is the variance of the difference of the two sample means (each arm's sample variance
    over its count); ``tau2``, the mixing variance, defaults to the pooled variance, i.e. effects
    are expected on the scale of one standard deviation of a single observation. A caller keeps
    the running minimum of these readings: that minimum is the always-valid p-value.
    """
    va, vb = a.variance, b.variance
    if va is None or vb is None or a.mean is None or b.mean is None:
        return None
    v = va / a.n + vb / b.n
    if tau2 is None:
        tau2 = ((a.n - 1) * va + (b.n - 1) * vb) / max(1, a.n + b.n - 2)
    if v <= 0:
        return None if b.mean == a.mean else 0.0
    return min(1.0, 1.0 / mixture_lr(b.mean - a.mean, v, tau2))


class VariantStats:
    """Per-variant counters, updated on the event loop thread only (no locks).

    ``pos`` counts the requests ever observed; the latency ring is preallocated, so an
    observation is one store and one increment."""

    __slots__ = ("correct", "errors", "labels", "lat", "pos", "rewards", "shadow_agreed", "shadow_compared",
                 "shadow_dropped", "shadow_errors")

    def __init__(self) -> None:
        self.errors = 0
        self.lat: list[float] = [0.0] * LATENCY_WINDOW
        self.pos = 0
        self.rewards = Moments()
        self.labels = 0
        self.correct = 0
        self.shadow_compared = 0
        self.shadow_agreed = 0
        self.shadow_dropped = 0
        self.shadow_errors = 0

    @property
    def requests(self) -> int:
        return self.pos

    def observe(self, ok: bool, seconds: float) -> None:
        """One answered request: ``ok`` False for server-side failures (not for bad input)."""
        self.lat[self.pos % LATENCY_WINDOW] = seconds
        self.pos += 1
        if not ok:
            self.errors += 1

    def latencies_since(self, pos: int = 0) -> list[float]:
        """The latencies recorded since absolute position ``pos`` (as many as the window still holds)."""
        start = max(pos, self.pos - LATENCY_WINDOW, 0)
        return [self.lat[i % LATENCY_WINDOW] for i in range(start, self.pos)]

    def snapshot(self) -> Mark:
        return Mark(self.pos, self.errors, self.pos)

    @property
    def agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_compared if self.shadow_compared else None


@dataclass(frozen=True)
class Mark:
    """Where a variant's counters stood at one moment (a rollout step's start)."""

    requests: int = 0
    errors: int = 0
    pos: int = 0


def window(stats: VariantStats, since: Mark | None = None) -> dict[str, Any]:
    """Requests, error rate and latency percentiles (seconds) since ``since`` (or ever)."""
    since = since or Mark()
    n = stats.requests - since.requests
    errors = stats.errors - since.errors
    lat = stats.latencies_since(since.pos)
    return {
        "requests": n, "errors": errors, "error_rate": errors / n if n else None,
        "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                      "samples": len(lat)},
    }
