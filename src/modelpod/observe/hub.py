"""Observer: what the engine keeps for tracing, payload logging, drift and recent errors.

The engine makes one (``engine.observe``); the protocols and the console read it. Its read API:

- ``drift_table(name, version=None)``: what ``GET /v2/models/{name}/drift`` answers;
- ``recent_errors(limit=50)``: the last failed requests, newest first;
- ``tracing``: the Tracing object, or None when tracing is off (``tracing_from_env`` at the edge).

Off (no tracing, no ``payload_log``, no reference in the pod) the hot path pays an attribute read
or two per request.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from modelpod.errors import ModelpodError
from modelpod.model import Batch
from modelpod.observe.context import SPAN, TRACE
from modelpod.observe.drift import DRIFT, MODERATE, DriftMonitor, DriftWorker, read_reference
from modelpod.observe.payload import PayloadLogger, PayloadLogSpec, PayloadSink
from modelpod.serving.metrics import Counter, CounterFunc, GaugeFunc, LabelValues, ServingMetrics

if TYPE_CHECKING:
    from modelpod.observe.tracing import Tracing
    from modelpod.serving.registry import ModelEntry, ModelRegistry

log = logging.getLogger("modelpod.observe")
ERRORS_KEPT = 100
SECTION_FEATURES = 10  # features per model version in the console's drift table
_OTEL_ON = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_from_env(env: Mapping[str, str]) -> Tracing | None:
    """Tracing as ``OTEL_*`` asks (the SDK is imported only then), or None."""
    if not any(env.get(k) for k in _OTEL_ON):
        return None
    from modelpod.observe.tracing import Tracing

    return Tracing.from_env(env)


class Observer:
    def __init__(self, metrics: ServingMetrics, registry: ModelRegistry,
                 payload_logs: Mapping[str, PayloadLogSpec | None] | None = None,
                 entries: Callable[[str, str | None], list[ModelEntry]] | None = None,
                 drift_on: Callable[[str], bool] | None = None,
                 sections: dict[str, Callable[[], Mapping[str, Any]]] | None = None) -> None:
        self.registry = registry
        # The console's optional sections (engine.console_sections): "drift" joins once a model has a monitor.
        self.sections = sections if sections is not None else {}
        self.drift_on = drift_on or (lambda name: True)  # the config file's ``drift: on|off``
        self._tracing: Tracing | None = None
        # The entries a name stands for: the engine's knows routes (their variants and shadows).
        self.entries_of = entries or self._versions
        self.monitors: dict[tuple[str, str], DriftMonitor] = {}
        self.drift = DriftWorker()
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        labels = ("model", "version")
        self.payload_written = Counter("modelpod_payload_log_records_total",
                                       "Request/response pairs written to the payload log sink.", labels)
        self.payload_dropped = Counter("modelpod_payload_log_dropped_total",
                                       "Sampled pairs not logged: the queue was full or the sink failed.",
                                       (*labels, "reason"))
        self.payload: PayloadLogger | None = None
        self.configure_payload(payload_logs or {})
        dlabels = (*labels, "variant")
        for family in (
            self.payload_written, self.payload_dropped,
            GaugeFunc("modelpod_drift_psi", "Population stability index of one input feature, live against the "
                      "pod's reference.", (*dlabels, "feature"), self._psi),
            GaugeFunc("modelpod_drift_score", "Largest per-feature PSI of the model version.", dlabels, self._score),
            CounterFunc("modelpod_drift_rows_total", "Input rows binned for drift.", dlabels, self._rows),
            CounterFunc("modelpod_drift_skipped_batches_total", "Batches not binned for drift (the drift queue was "
                        "full).", labels, lambda: [(k, float(v)) for k, v in self.drift.skipped.items()]),
            GaugeFunc("modelpod_queue_capacity", "Requests a model's queue holds before it answers 429 "
                      "(its max_queue).", labels, self._capacity),
        ):
            metrics.registry.add(family)
        registry.on_ready.append(self.attach)

    @property
    def tracing(self) -> Tracing | None:
        return self._tracing

    @tracing.setter
    def tracing(self, tracing: Tracing | None) -> None:
        """Turn tracing on (or off) for the loaded models too."""
        self._tracing = tracing
        for entry in self.registry:
            if entry.batcher is not None:
                entry.batcher.tracing = tracing

    def configure_payload(self, specs: Mapping[str, PayloadLogSpec | None]) -> None:
        """Log payloads as ``specs`` say ("" the global spec; a config file's ``payload_log``)."""
        old = self.payload
        self.payload = PayloadLogger(specs, self.payload_written, self.payload_dropped) if any(
            s is not None for s in specs.values()) else None
        if old is not None:
            old.close()

    # -- wiring -----------------------------------------------------------------------------------
    def attach(self, entry: ModelEntry) -> None:
        """A model version became ready: hang tracing and its drift monitor on its batcher."""
        batcher = entry.batcher
        if batcher is None:
            return
        batcher.tracing = self._tracing
        key = (entry.name, entry.version_text)
        monitor = self.monitors.get(key)
        if monitor is None:
            if not self.drift_on(entry.name):
                return
            pod = getattr(entry.model, "pod", None)
            reference = read_reference(pod.path) if pod is not None else None
            if reference is None:
                return
            monitor = self.monitors[key] = DriftMonitor(reference, entry.name, entry.version_text, entry.label)
            self.sections.setdefault("drift", self.drift_section)
        batcher.on_batch = partial(self.drift.offer, monitor)  # per batch: no Python frame of its own

    # -- the hot path (called by the engine) -------------------------------------------------------
    def answered(self, entry: ModelEntry, variant: str, route: str, rid: str | None, inputs: Batch,
                 outputs: Batch, sink: PayloadSink | None = None) -> None:
        """Log an answered request's payload: to ``sink`` when the engine drew it already
        (``payload.pick``, before building these arguments), else if the sample chooses it."""
        payload = self.payload
        if payload is None:
            return
        if sink is not None:
            payload.put(sink, entry.name, entry.version_text, variant, route, rid, inputs, outputs)
        else:
            payload.offer(entry.name, entry.version_text, variant, route, rid, inputs, outputs)

    def failed(self, name: str, entry: ModelEntry | None, exc: BaseException) -> None:
        """Keep a failed request for ``recent_errors`` (the console's list)."""
        status = exc.http_status if isinstance(exc, ModelpodError) else 500
        message = exc.message if isinstance(exc, ModelpodError) else f"{type(exc).__name__}: {exc}"
        trace = TRACE.get()
        self.errors.append({
            "time": time.time(), "model": entry.name if entry is not None else name,
            "version": entry.version_text if entry is not None else "", "status": status, "error": message[:500],
            "trace_id": trace[0] if trace is not None else None})

    @staticmethod
    def span() -> Any:
        """The current request's server span while it is recording (else None)."""
        span = SPAN.get()
        return span if span is not None and span.is_recording() else None

    # -- the read API -----------------------------------------------------------------------------
    def recent_errors(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.errors)[::-1][:limit]

    def drift_table(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Drift of every served version of ``name`` (a model, or a route's variants and shadows), or of one."""
        variants = []
        for entry in self.entries_of(name, version):
            monitor = self.monitors.get((entry.name, entry.version_text))
            if monitor is not None:
                variants.append(monitor.table())
            else:
                variants.append({"model": entry.name, "version": entry.version_text, "variant": entry.label,
                                 "rows": 0, "score": None, "status": "no reference" if entry.ready else "not loaded",
                                 "features": []})
        return {"model": name, "variants": variants}

    def drift_section(self) -> dict[str, Any]:
        """The console's drift table: each monitored version's score, then its features by PSI."""
        rows: list[list[Any]] = []
        for m in sorted(self.monitors.values(), key=lambda m: (m.model, m.version)):
            table = m.table()
            rows.append([m.variant, "(score)", table["score"], table["status"], table["window_rows"]])
            features = sorted(table["features"], key=lambda f: -(f["psi"] or 0.0))[:SECTION_FEATURES]
            rows.extend([m.variant, f["feature"], f["psi"], f["status"], f["rows"]] for f in features)
        return {"title": "Drift", "columns": ["model", "feature", "psi", "status", "live rows"], "rows": rows,
                "note": f"PSI of live inputs against the pod's reference (the {SECTION_FEATURES} highest per model "
                        f"version); below {MODERATE:g} stable, {MODERATE:g}-{DRIFT:g} moderate, above {DRIFT:g} drift."}

    def _versions(self, name: str, version: str | None) -> list[ModelEntry]:
        if version is not None:
            return [e for e in self.registry.versions(name).values() if e.version_text == version]
        return list(self.registry.versions(name).values())

    # -- metrics ----------------------------------------------------------------------------------
    def _psi(self) -> Iterable[tuple[LabelValues, float]]:
        for m in list(self.monitors.values()):
            for feature, value in m.scores():
                yield (m.model, m.version, m.variant, feature), value

    def _score(self) -> Iterable[tuple[LabelValues, float]]:
        for m in list(self.monitors.values()):
            score = m.score()
            if score is not None:
                yield (m.model, m.version, m.variant), score

    def _rows(self) -> Iterable[tuple[LabelValues, float]]:
        return [((m.model, m.version, m.variant), float(m.rows)) for m in list(self.monitors.values())]

    def _capacity(self) -> Iterable[tuple[LabelValues, float]]:
        return [((e.name, e.version_text), float(e.policy.max_queue)) for e in self.registry]

    def close(self) -> None:
        """Flush the payload log and the traces; stop the drift thread."""
        if self.payload is not None:
            self.payload.close()
        self.drift.close()
        if self.tracing is not None:
            try:
                self.tracing.shutdown()
            except Exception as exc:  # an unreachable collector must not stop the exit
                log.warning("traces not exported at exit", extra={"fields": {"error": str(exc)}})
