"""The trace of the request being answered, for log lines: a context variable, no OpenTelemetry import.

Each HTTP request is served in its own asyncio task (and each gRPC call in its own), so a value set
while answering one request is never seen by another.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

# (trace id, span id, flags) as lower-case hex, set while a traced request is answered.
TRACE: ContextVar[tuple[str, str, str] | None] = ContextVar("modelpod_trace", default=None)
# The request's server span (an OpenTelemetry Span), for the engine and batcher to hang theirs on.
SPAN: ContextVar[Any] = ContextVar("modelpod_span", default=None)


def trace_fields() -> dict[str, str]:
    """``{"trace_id", "span_id"}`` of the current request, or nothing outside a traced request."""
    current = TRACE.get()
    if current is None:
        return {}
    return {"trace_id": current[0], "span_id": current[1]}


def response_headers() -> list[tuple[str, str]]:
    """``traceparent`` (the server span) and ``modelpod-trace-id`` of the current request, if traced."""
    current = TRACE.get()
    if current is None:
        return []
    return [("traceparent", f"00-{current[0]}-{current[1]}-{current[2]}"), ("modelpod-trace-id", current[0])]
