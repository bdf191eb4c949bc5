"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges, histograms.

Names are ``modelpod_*`` in base units (seconds, bytes); labels are ``model`` and ``version``
plus ``outcome``/``protocol`` where they apply, and ``route``/``variant`` on the requests a route
chose (left out of a sample where empty, which Prometheus reads the same as absent). Children
are created once per model and kept by the caller, so the hot path is an attribute increment.
Everything is updated from the event loop thread only, so there are no locks.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from modelpod.errors import InferenceTimeoutError, ModelpodError, OverloadedError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
OUTCOMES = ("success", "client_error", "overloaded", "timeout", "error")
LabelValues = tuple[str, ...]
OPTIONAL_LABELS = frozenset({"route", "variant"})


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label for a finished request."""
    if exc is None:
        return "success"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, InferenceTimeoutError):
        return "timeout"
    if isinstance(exc, ModelpodError) and 400 <= exc.http_status < 500:
        return "client_error"
    return "error"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)
             if v or n not in OPTIONAL_LABELS]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self, values: LabelValues) -> None:
        """Forget one label set (a model that is gone for good)."""


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, help, labelnames)
        self.children: dict[LabelValues, CounterChild] = {}

    def labels(self, *values: str) -> CounterChild:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = CounterChild()
        return child

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(c.value)}"
                for k, c in sorted(self.children.items())]

    def remove(self, values: LabelValues) -> None:
        for key in [k for k in self.children if k[: len(values)] == values]:
            del self.children[key]


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, help, labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.children: dict[LabelValues, HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = HistogramChild(self.bounds)
        return child

    def samples(self) -> list[str]:
        lines: list[str] = []
        for key, child in sorted(self.children.items()):
            running = 0
            for bound, n in zip((*self.bounds, math.inf), child.counts, strict=True):
                running += n
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            base = _labels(self.labelnames, key)
            lines.append(f"{self.name}_sum{base} {_number(child.sum)}")
            lines.append(f"{self.name}_count{base} {child.count}")
        return lines

    def remove(self, values: LabelValues) -> None:
        for key in [k for k in self.children if k[: len(values)] == values]:
            del self.children[key]


class GaugeFunc(_Family):
    """A gauge read at scrape time from a callback: nothing to update on the hot path."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str],
                 read: Callable[[], Iterable[tuple[LabelValues, float]]]) -> None:
        super().__init__(name, help, labelnames)
        self.read = read

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(self.read())]


class CounterFunc(GaugeFunc):
    """A counter read at scrape time from a callback that only ever grows."""

    kind = "counter"


class MetricsRegistry:
    def __init__(self) -> None:
        self.families: list[_Family] = []

    def add(self, family: _Family) -> None:
        if any(f.name == family.name for f in self.families):
            raise ValueError(f"metric {family.name} registered twice")
        self.families.append(family)

    def render(self) -> bytes:
        lines: list[str] = []
        for family in self.families:
            samples = family.samples()
            if samples:
                lines.extend(family.header())
                lines.extend(samples)
        return ("\n".join(lines) + "\n").encode() if lines else b""


class ModelMetrics:
    """The children one model version updates on the hot path (created on first use)."""

    __slots__ = ("_families", "batch_requests", "batch_rows", "evictions", "key", "latency", "loads", "requests",
                 "rkey")

    def __init__(self, metrics: ServingMetrics, model: str, version: str, route: str = "", variant: str = "") -> None:
        self._families = metrics
        self.key: LabelValues = (model, version)
        self.rkey: LabelValues = (model, version, route, variant)
        self.requests: dict[tuple[str, str], CounterChild] = {}
        self.latency: dict[str, HistogramChild] = {}
        self.batch_rows = metrics.batch_rows.labels(model, version)
        self.batch_requests = metrics.batch_requests.labels(model, version)
        self.loads = {o: metrics.loads.labels(model, version, o) for o in ("success", "error")}
        self.evictions = metrics.evictions.labels(model, version)

    def observe_request(self, protocol: str, outcome: str, seconds: float) -> None:
        counter = self.requests.get((protocol, outcome))
        if counter is None:
            counter = self.requests[(protocol, outcome)] = self._families.requests.labels(
                *self.rkey, protocol, outcome)
        counter.value += 1
        histogram = self.latency.get(outcome)
        if histogram is None:
            histogram = self.latency[outcome] = self._families.latency.labels(*self.rkey, outcome)
        histogram.observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)


ModelGauge = Callable[[], Iterable[tuple[LabelValues, float]]]


class ServingMetrics:
    """Every ``modelpod_*`` family a server exports. Gauges read the registry at scrape time."""

    def __init__(self, queue_depth: ModelGauge, inflight: ModelGauge, load_seconds: ModelGauge,
                 memory_bytes: ModelGauge, ready: ModelGauge, replicas: ModelGauge | None = None) -> None:
        labels = ("model", "version")
        self.registry = MetricsRegistry()
        self.requests = Counter("modelpod_requests_total", "Inference requests answered, by protocol and outcome.",
                                (*labels, "route", "variant", "protocol", "outcome"))
        self.latency = Histogram("modelpod_request_duration_seconds",
                                 "Time from receiving an inference request to its answer, by outcome.",
                                 (*labels, "route", "variant", "outcome"), LATENCY_BUCKETS)
        self.batch_rows = Histogram("modelpod_batch_rows", "Rows per batch run by the model.", labels, ROW_BUCKETS)
        self.batch_requests = Histogram("modelpod_batch_requests", "Requests merged into each batch.", labels,
                                        ROW_BUCKETS)
        self.loads = Counter("modelpod_model_loads_total", "Model loads, by outcome.", (*labels, "outcome"))
        self.evictions = Counter("modelpod_model_evictions_total",
                                 "Models unloaded to stay within the memory budget.", labels)
        # Replicas (serving/replicas.py): decisions and replacements, by model version.
        self.scale_events = Counter("modelpod_scale_events_total", "Replica scaling decisions, by direction.",
                                    (*labels, "direction"))
        self.replica_restarts = Counter("modelpod_replica_restarts_total",
                                        "Replicas replaced, by reason (crashed, killed, hung, memory).",
                                        (*labels, "reason"))
        for family in (
            self.requests, self.latency, self.batch_rows, self.batch_requests,
            GaugeFunc("modelpod_queue_depth", "Requests waiting for a batch.", labels, queue_depth),
            GaugeFunc("modelpod_inflight_requests", "Requests accepted and not yet answered.", labels, inflight),
            GaugeFunc("modelpod_model_load_duration_seconds", "How long the last load of the model took.",
                      labels, load_seconds),
            GaugeFunc("modelpod_model_memory_bytes",
                      "Memory attributed to the loaded model (RSS growth at load, at least its weights).",
                      labels, memory_bytes),
            GaugeFunc("modelpod_model_ready", "1 when the model is loaded and serving.", labels, ready),
            self.loads, self.evictions,
        ):
            self.registry.add(family)
        if replicas is not None:
            self.registry.add(GaugeFunc("modelpod_replicas", "Replicas serving the model (1 for a thread-mode model).",
                                        labels, replicas))
        self.registry.add(self.scale_events)
        self.registry.add(self.replica_restarts)

    def for_model(self, model: str, version: str, route: str = "", variant: str = "") -> ModelMetrics:
        """The children of one model version; with ``route``/``variant``, those of its requests a route chose."""
        return ModelMetrics(self, model, version, route, variant)

    def render(self) -> bytes:
        return self.registry.render()
