"""The server span of one REST request or gRPC call: made from ``traceparent``, current while the
request is answered (so log lines and the engine's spans see it), returned in the answer's headers.

Imported by the protocols without OpenTelemetry; only called when tracing is on. With the default
sampling almost every request is not sampled: it gets trace ids (the caller's, or new ones) for its
headers and logs and no span, in one function with no helper calls (``traced_rest``'s first branch),
since that branch runs for every request of a loaded server.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from modelpod.errors import ModelpodError
from modelpod.observe.context import SPAN, TRACE, parse_traceparent, response_headers
from modelpod.protocols.wire import Response

if TYPE_CHECKING:
    from modelpod.observe.tracing import Tracing
    from modelpod.protocols.wire import Request

_bits = random.getrandbits


def new_ids() -> str:
    """48 random hex digits: a trace id (the first 32) and a span id (the last 16). One draw for
    both; an all-zero id, which W3C forbids, has odds of 2**-128. (``to_bytes().hex()`` is about
    twice as fast as formatting the int with ``:048x``, and gives the same digits.)"""
    return _bits(192).to_bytes(24, "big").hex()


def _sampled(tracing: Tracing, parsed: tuple[int, int, int] | None) -> bool:
    """The default sampling's decision: the caller's sampled flag, else the root rate."""
    roots = tracing.roots
    assert roots is not None
    return bool(parsed[2] & 1) if parsed is not None else roots.take()


def _enter(span: Any) -> tuple[Any, Any]:
    ctx = span.get_span_context()
    ids = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{int(ctx.trace_flags) & 0xFF:02x}")
    return SPAN.set(span), TRACE.set(ids)


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
    headers = req.headers
    traceparent = headers.get("traceparent")
    roots = tracing.roots
    if roots is not None:
        if traceparent:
            parsed = parse_traceparent(traceparent)
            sampled = bool(parsed[2] & 1) if parsed is not None else roots.take()
        else:  # take()'s own first test, inlined: almost every request stops there
            parsed, sampled = None, roots.clock() >= roots.next_at and roots.take()
        if not sampled:
            # Not sampled (the hot path): ids for the headers and log lines, no span, no SPAN change
            # (it is None in every request's task: only a sampled request sets it, and resets it).
            ids = new_ids()
            trace_id = f"{parsed[0]:032x}" if parsed is not None else ids[:32]
            span_id = ids[32:]
            token = TRACE.set((trace_id, span_id, "00"))
            try:
                response = await answer(req)
            finally:
                TRACE.reset(token)
            return Response(response.status, response.body, response.content_type,
                            [*(response.headers or ()), ("traceparent", f"00-{trace_id}-{span_id}-00"),
                             ("modelpod-trace-id", trace_id)], response.close)
    span = tracing.request(_span_name(req.method, req.path), traceparent, headers.get("tracestate"),
                           {"http.request.method": req.method, "url.path": req.path, "rpc.system": "oip-v2-rest"})
    tokens = _enter(span)
    try:
        response = await answer(req)
        trace_headers = response_headers()
    except BaseException:
        tracing.finish(span, 500)
        raise
    finally:
        _leave(tokens)
    tracing.finish(span, response.status)
    return Response(response.status, response.body, response.content_type,
                    [*(response.headers or ()), *trace_headers], response.close)


async def traced_grpc(tracing: Tracing, method: str, metadata: Any, call: Callable[[], Awaitable[Any]]) -> Any:
    """Run one gRPC call inside its server span (``traceparent`` read from the invocation metadata)."""
    found = {str(k): str(v) for k, v in metadata or () if k in ("traceparent", "tracestate")}
    traceparent = found.get("traceparent")
    span = None
    if tracing.roots is not None and not _sampled(tracing, parsed := parse_traceparent(traceparent)):
        ids = new_ids()
        trace_id = f"{parsed[0]:032x}" if parsed is not None else ids[:32]
        tokens = SPAN.set(None), TRACE.set((trace_id, ids[32:], "00"))
    else:
        span = tracing.request(method, traceparent, found.get("tracestate"),
                               {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                                "rpc.method": method.rsplit("/", 1)[-1]})
        tokens = _enter(span)
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
