"""The trace of the request being answered, for log lines: a context variable, no OpenTelemetry import.

Each HTTP request is served in its own asyncio task (and each gRPC call in its own), so a value set
while answering one request is never seen by another.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[0-9a-zA-Z._-]*)?")

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


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid W3C ``traceparent``; None for anything else."""
    if not value or len(value) > 512:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None  # ff is forbidden; version 00 has exactly four fields
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if tid == 0 or sid == 0:
        return None
    return tid, sid, int(flags, 16)
