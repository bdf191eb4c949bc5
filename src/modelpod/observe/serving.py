"""The server span of one REST request or gRPC call: made from ``traceparent``, current while the
request is answered (so log lines and the engine's spans see it), returned in the answer's headers.

Imported by the protocols without OpenTelemetry; only called when tracing is on.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from modelpod.errors import ModelpodError
from modelpod.observe.context import SPAN, TRACE, parse_traceparent, response_headers

if TYPE_CHECKING:
    from modelpod.observe.tracing import Tracing
    from modelpod.protocols.http import Request, Response


def _enter(span: Any) -> tuple[Any, Any]:
    ctx = span.get_span_context()
    ids = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{int(ctx.trace_flags) & 0xFF:02x}")
    return SPAN.set(span), TRACE.set(ids)


def _begin(tracing: Tracing, name: Callable[[], str], traceparent: str | None, tracestate: str | None,
           attributes: Callable[[], dict[str, Any]]) -> tuple[Any, tuple[Any, Any]]:
    """(the server span or None, the context tokens). With the default sampling, a request that is
    not sampled gets trace ids (the caller's, or new ones) for its headers and logs, and no span:
    its name and attributes are never built."""
    roots = tracing.roots
    if roots is not None:
        parsed = parse_traceparent(traceparent) if traceparent else None
        sampled = bool(parsed[2] & 1) if parsed is not None else roots.take()
        if not sampled:
            # One draw for both ids (an all-zero id, which W3C forbids, has odds of 2**-128).
            ids = f"{random.getrandbits(192):048x}"
            trace_id = f"{parsed[0]:032x}" if parsed is not None else ids[:32]
            return None, (SPAN.set(None), TRACE.set((trace_id, ids[32:], "00")))
    span = tracing.request(name(), traceparent, tracestate, attributes())
    return span, _enter(span)


def _leave(tokens: tuple[Any, Any]) -> None:
    SPAN.reset(tokens[0])
    TRACE.reset(tokens[1])


def _span_name(method: str, path: str) -> str:
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return f"{method} /v2/models/{{model}}/infer"
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return f"{method} /v1/models/{{model}}:predict"
    return method


async def traced_rest(tracing: Tracing, req: Request, answer: Callable[[Request], Awaitable[Response]]) -> Response:
    """Answer ``req`` inside its server span; the answer carries ``traceparent`` and ``modelpod-trace-id``."""
    from modelpod.protocols.http import Response

    headers = req.headers
    span, tokens = _begin(tracing, lambda: _span_name(req.method, req.path), headers.get("traceparent"),
                          headers.get("tracestate"), lambda: {"http.request.method": req.method, "url.path": req.path,
                                                              "rpc.system": "oip-v2-rest"})
    try:
        response = await answer(req)
        trace_headers = response_headers()
    except BaseException:
        if span is not None:
            tracing.finish(span, 500)
        raise
    finally:
        _leave(tokens)
    if span is not None:
        tracing.finish(span, response.status)
    return Response(response.status, response.body, response.content_type,
                    [*(response.headers or ()), *trace_headers], response.close)


async def traced_grpc(tracing: Tracing, method: str, metadata: Any, call: Callable[[], Awaitable[Any]]) -> Any:
    """Run one gRPC call inside its server span (``traceparent`` read from the invocation metadata)."""
    found = {str(k): str(v) for k, v in metadata or () if k in ("traceparent", "tracestate")}
    span, tokens = _begin(tracing, lambda: method, found.get("traceparent"), found.get("tracestate"),
                          lambda: {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                                   "rpc.method": method.rsplit("/", 1)[-1]})
    status = 200
    try:
        return await call()
    except ModelpodError as exc:
        status = exc.http_status
        raise
    except BaseException:
        status = 500
        raise
    finally:
        _leave(tokens)
        if span is not None:
            tracing.finish(span, status)
