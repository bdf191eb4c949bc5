"""OpenTelemetry tracing (the ``otel`` extra): W3C ``traceparent`` in, spans out over OTLP/HTTP.

Spans, per inference request::

    POST /v2/models/{name}/infer   SERVER, child of the caller's traceparent (when valid)
      queue                        from arrival in the batcher to the start of its batch
    batch                          child of its first traced request, linked to every one in it
      predict                      the model's run on the batch

Configuration is the standard ``OTEL_*`` variables, read once at the edge (``from_env``): tracing
is on when ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``console``, or (unset) when an OTLP endpoint
is given; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off. Off, nothing
here is imported and no span object is made. The sampler is ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``);
unset, modelpod follows the caller's sampled flag and starts at most ``DEFAULT_ROOT_RATE`` new
traces a second, so a lone request is always traced and a loaded server is not slowed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from modelpod import __version__
from modelpod.errors import MissingExtraError, UsageError
from modelpod.observe.context import parse_traceparent

try:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
    from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace.span import Span, TraceState
except ImportError as exc:  # pragma: no cover - exercised where the extra is missing
    raise MissingExtraError("otel", "opentelemetry-sdk", "tracing (OTEL_* variables)") from exc

DEFAULT_ROOT_RATE = 10.0  # new traces a second when OTEL_TRACES_SAMPLER is unset


def traceparent_of(span: Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 0xFF:02x}"


class RateLimitedSampler(sampling.Sampler):
    """Samples at most ``rate`` traces a second (a token bucket, one second deep).

    ``take`` runs for every request a server answers, and almost always says no: so the bucket
    also keeps the time it next holds a whole token (``next_at``), and a no before then is one clock
    read and one comparison, with no lock and no write (``clock() < next_at``: callers on the hot
    path test that themselves, before calling). The bucket's level is brought up to date only when
    a token may be there, which gives the same answers as refilling it on every call."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = max(0.0, rate)
        self._depth = max(1.0, self.rate)
        self._tokens = self._depth
        self.clock = clock
        self._last = clock()
        self.next_at = self._last  # a whole token is there from this time on
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Whether one more trace fits in the rate now (and count it)."""
        now = self.clock()
        if now < self.next_at:
            return False
        with self._lock:
            tokens = min(self._depth, self._tokens + (now - self._last) * self.rate)
            self._last = now
            take = tokens >= 1.0
            if take:
                tokens -= 1.0
            self._tokens = tokens
            # When the level reaches 1 again (never, at rate 0, once the one token is spent).
            self.next_at = now if tokens >= 1.0 else (now + (1.0 - tokens) / self.rate if self.rate else math.inf)
        return take

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> sampling.SamplingResult:
        take = self.take()
        decision = sampling.Decision.RECORD_AND_SAMPLE if take else sampling.Decision.DROP
        return sampling.SamplingResult(decision, attributes if take else None)

    def get_description(self) -> str:
        return f"RateLimitedSampler{{{self.rate:g}/s}}"


class BatchTrace:
    """The spans of one batch: ``batch`` (linked to its requests) and its ``predict`` child."""

    __slots__ = ("batch", "run")

    def __init__(self, batch: Span, run: Span) -> None:
        self.batch = batch
        self.run = run

    def ran(self, error: BaseException | None) -> None:
        if error is not None:
            self.run.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))
        self.run.end()

    def done(self) -> None:
        self.batch.end()


class Tracing:
    """A tracer provider of modelpod's own (not the process-global one) and the spans it makes."""

    def __init__(self, provider: TracerProvider, roots: RateLimitedSampler | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("modelpod", __version__)
        # The default sampling, decided before any span object exists (observe/serving.py): follow
        # the caller's sampled flag, and start new traces at this rate. None: the provider's sampler.
        self.roots = roots

    @classmethod
    def with_exporter(cls, exporter: SpanExporter, *, sampler: sampling.Sampler | None = None,
                      batch: bool = False, resource: Resource | None = None) -> Tracing:
        """Tracing into ``exporter`` (tests: the SDK's InMemorySpanExporter); every trace sampled by default."""
        provider = TracerProvider(sampler=sampler or sampling.ParentBased(sampling.ALWAYS_ON),
                                  resource=resource or Resource.create({"service.name": "modelpod"}))
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        return cls(provider)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracing | None:
        """Tracing as the ``OTEL_*`` variables in ``env`` ask, or None when they leave it off."""
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if exporter_name in ("", "none") and not (exporter_name == "" and endpoint):
            return None
        exporter: SpanExporter
        if exporter_name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        elif exporter_name in ("otlp", ""):
            exporter = _otlp_exporter(env)
        else:
            raise UsageError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: modelpod exports otlp, console or none")
        roots = RateLimitedSampler(DEFAULT_ROOT_RATE) if not env.get("OTEL_TRACES_SAMPLER", "").strip() else None
        # With ``roots``, only requests already chosen reach the provider: it samples all of them.
        sampler = sampling.ParentBased(sampling.ALWAYS_ON) if roots is not None else sampler_from_env(env)
        provider = TracerProvider(sampler=sampler, resource=resource_from_env(env))
        delay = _number(env, "OTEL_BSP_SCHEDULE_DELAY")
        provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=int(_number(env, "OTEL_BSP_MAX_QUEUE_SIZE") or 2048),
            schedule_delay_millis=delay if delay is not None else 5000.0))
        return cls(provider, roots)

    # -- the spans --------------------------------------------------------------------------------
    def request(self, name: str, traceparent: str | None, tracestate: str | None = None,
                attributes: Mapping[str, Any] | None = None) -> Span:
        """The SERVER span of one request, child of a valid ``traceparent`` (a malformed one is ignored)."""
        parent = None
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            state = TraceState.from_header([tracestate]) if tracestate else None
            remote = SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=TraceFlags(parsed[2] & 0x01),
                                 trace_state=state)
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    @staticmethod
    def finish(span: Span, status: int, error: str | None = None) -> None:
        """End a request span with its answer's status (5xx marks the span as failed)."""
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, (error or str(status))[:300]))
        span.end()

    @staticmethod
    def headers(span: Span) -> list[tuple[str, str]]:
        """The answer's trace headers: ``traceparent`` of the server span and ``modelpod-trace-id``."""
        ctx = span.get_span_context()
        return [("traceparent", traceparent_of(span)), ("modelpod-trace-id", f"{ctx.trace_id:032x}")]

    def batch(self, requests: Sequence[tuple[Span, int]], rows: int, model: str) -> BatchTrace | None:
        """At the start of a batch: each request's ``queue`` span, then ``batch`` and ``predict``.

        ``requests``: (request span, arrival time in ns since the epoch) of each traced request."""
        now = time.time_ns()
        recording = [(span, arrived) for span, arrived in requests if span.is_recording()]
        if not recording:
            return None
        for span, arrived in recording:
            queued = self.tracer.start_span("queue", context=trace.set_span_in_context(span), start_time=arrived,
                                            attributes={"modelpod.model": model})
            queued.end(end_time=now)
        links = [Link(span.get_span_context()) for span, _ in recording]
        attributes: dict[str, Any] = {"modelpod.model": model, "modelpod.batch.rows": rows,
                                      "modelpod.batch.requests": len(requests)}
        batch = self.tracer.start_span("batch", context=trace.set_span_in_context(recording[0][0]),
                                       links=links, start_time=now, attributes=attributes)
        run = self.tracer.start_span("predict", context=trace.set_span_in_context(batch), start_time=now,
                                     attributes={"modelpod.model": model, "modelpod.batch.rows": rows})
        return BatchTrace(batch, run)

    def shutdown(self) -> None:
        """Export what is buffered and stop (the server's exit)."""
        self.provider.shutdown()


def sampler_from_env(env: Mapping[str, str]) -> sampling.Sampler:
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not name:
        return sampling.ParentBased(RateLimitedSampler(DEFAULT_ROOT_RATE))
    ratio = 1.0
    if arg:
        try:
            ratio = float(arg)
        except ValueError:
            raise UsageError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} must be a number") from None
    samplers: dict[str, Any] = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise UsageError(f"OTEL_TRACES_SAMPLER={name!r}: use one of {', '.join(samplers)}")
    made: sampling.Sampler = samplers[name]()
    return made


def resource_from_env(env: Mapping[str, str]) -> Resource:
    attributes: dict[str, Any] = {"service.version": __version__}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes["service.name"] = env.get("OTEL_SERVICE_NAME") or attributes.get("service.name") or "modelpod"
    return Resource(attributes)


def _headers(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[unquote(key.strip())] = unquote(value.strip())
    return out


def _number(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} must be a number") from None


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol != "http/protobuf":
        raise UsageError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: modelpod exports OTLP over http/protobuf "
                         "(point the endpoint at the collector's port 4318)")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # pragma: no cover - the extra installs it
        raise MissingExtraError("otel", "opentelemetry-exporter-otlp-proto-http", "OTLP export") from exc
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
        endpoint = base.rstrip("/") + "/v1/traces"
    headers = _headers(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or "")
    timeout_ms = _number(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or _number(env, "OTEL_EXPORTER_OTLP_TIMEOUT")
    exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint, headers=headers or None,
                                              timeout=(timeout_ms or 10_000.0) / 1000.0)
    return exporter
