"""OIP v2 gRPC (``inference.GRPCInferenceService``) on grpc.aio, in the server's own event loop.

Inputs arrive as typed ``contents`` or as ``raw_input_contents``; the answer uses the same form
(raw whenever the request was raw, or an output is FP16/BF16, which only travel raw; the tensors'
translation is protocols/grpc_tensors.py). Errors map
to status codes through ``ModelpodError.grpc_code``. Every answer carries the trailing
metadata ``modelpod-variant: NAME:VERSION``; a route's sticky key is read from the invocation
metadata. gRPC is an optional extra: importing this module without grpcio raises
MissingExtraError with the install hint.

Tokens as over REST (protocols/auth.py): ``authorization: Bearer <token>`` metadata; a call without a
known token is UNAUTHENTICATED, outside its scopes or models PERMISSION_DENIED, over its rate
RESOURCE_EXHAUSTED with ``retry-after`` (seconds), ``grpc-retry-pushback-ms`` and a ``google.rpc.RetryInfo``
in ``grpc-status-details-bin``; a model's full queue is UNAVAILABLE with the same three. The
health calls (ServerLive, ServerReady) are open. Bounds (``server_options``): RPCs in progress,
streams per connection, connections (``max_connections``), metadata (``max_header_bytes``) and
received messages (``max_body_bytes``) as over REST, the TLS/HTTP/2 handshake within
``header_timeout_s``, idle connections closed after ``keepalive_timeout_s``, keepalive pings to
find dead peers, a connection age after which clients reconnect (and a grace for their calls), and
a deadline for calls that come without one (DEADLINE_EXCEEDED naming it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from modelpod.errors import (
    InvalidRequestError,
    MissingExtraError,
    ModelpodError,
    OverloadedError,
    RateLimitedError,
    UsageError,
)

try:
    import grpc
    from grpc import aio
except ImportError as exc:  # pragma: no cover - exercised where grpcio is missing
    raise MissingExtraError("grpc", "grpcio", "the gRPC endpoint") from exc

from google.protobuf import json_format

from modelpod.observe.context import response_headers
from modelpod.observe.serving import traced_grpc
from modelpod.protocols._generated import open_inference_pb2 as pb
from modelpod.protocols.auth import INFER, READ, Auth
from modelpod.protocols.grpc_tensors import encode_infer, read_heads, read_tensors
from modelpod.protocols.tls import TlsFiles
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

log = logging.getLogger("modelpod.serving")

SERVICE = "inference.GRPCInferenceService"
INFER_METHOD = f"/{SERVICE}/ModelInfer"
Rpc = Callable[[Any, Any, Any], Awaitable[Any]]  # (request, context, invocation metadata or None)
Handler = Callable[[Any, Any], Awaitable[Any]]


class Deadlines:
    """The server's deadline for the calls that come without one, kept by one timer for all of
    them (a sweep every ``tick`` seconds while any is open) instead of a timer per call: a call
    over it is cancelled within ``tick`` of its deadline and answered DEADLINE_EXCEEDED."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick = min(1.0, seconds / 4)
        self._open: dict[asyncio.Task[Any], float] = {}  # in order of arrival, so of deadline
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def enter(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._open[task] = loop.time() + self.seconds
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._sweep, loop)

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._open.pop(task, None)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` was cancelled by this deadline (not by its client), once."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None:  # Python 3.11+: the cancellation was ours and is handled
            uncancel()
        return True

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        overdue = []
        for task, end in self._open.items():
            if end > now:
                break
            overdue.append(task)
        for task in overdue:
            del self._open[task]
            self._expired.add(task)
            task.cancel()
        self._timer = loop.call_later(self.tick, self._sweep, loop) if self._open else None


class GrpcService:
    """The RPC implementations; ``handler()`` registers them without generated service code."""

    def __init__(self, engine: InferenceEngine, settings: Settings, auth: Auth | None = None) -> None:
        self.engine = engine
        self.auth = auth if auth is not None else Auth.from_settings(settings)
        if self.auth is not None:
            self.auth.attach(engine.metrics)
        self.deadline_s = settings.grpc_default_deadline_s
        self.deadlines = Deadlines(settings.grpc_default_deadline_s)
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix="modelpod-grpc-decode")

    def _authorize(self, metadata: Any, scope: str, model: str | None) -> None:
        assert self.auth is not None
        given: list[str] = [str(v) for k, v in metadata or () if k == "authorization"]
        if len(given) > 1:
            raise InvalidRequestError("more than one authorization metadata entry")
        self.auth.check(given[0] if given else None, scope, model)

    def _wrap(self, fn: Rpc, scope: str | None, model: Callable[[Any], str] | None = None, traced: str = "") -> Handler:
        async def call(request: Any, context: Any) -> Any:
            try:
                metadata = None
                if scope is not None and self.auth is not None:
                    metadata = context.invocation_metadata()
                    self._authorize(metadata, scope, model(request) if model is not None else None)
                tracing = self.engine.observe.tracing
                if traced and tracing is not None:  # a server span, child of the metadata's traceparent
                    if metadata is None:
                        metadata = context.invocation_metadata()
                    found = metadata
                    return await traced_grpc(tracing, traced, found, lambda: self._bounded(fn, request, context, found))
                return await self._bounded(fn, request, context, metadata)
            except ModelpodError as exc:
                await self._refuse(context, request, exc)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the call came without a deadline and took longer than the server's "
                                    f"{self.deadline_s:g}s (MODELPOD_GRPC_DEFAULT_DEADLINE_S); set a deadline")
            except Exception as exc:
                await context.abort(grpc.StatusCode.INTERNAL, _internal(request, exc))
        return call

    async def _bounded(self, fn: Rpc, request: Any, context: Any, metadata: Any) -> Any:
        """``fn``, within the server's deadline when the client set none (TimeoutError past it)."""
        if context.time_remaining() is not None:
            return await fn(request, context, metadata)
        task = asyncio.current_task()
        assert task is not None
        self.deadlines.enter(task, asyncio.get_running_loop())
        try:
            return await fn(request, context, metadata)
        except asyncio.CancelledError:
            if self.deadlines.expired(task):
                raise TimeoutError from None
            raise
        finally:
            self.deadlines.leave(task)

    async def _refuse(self, context: Any, request: Any, exc: ModelpodError) -> None:
        """Abort the call with ``exc``'s status; an overload or a rate limit says when to retry (in
        seconds, gRPC's retry pushback in milliseconds, and a google.rpc.RetryInfo)."""
        if isinstance(exc, OverloadedError):
            wait_s = exc.wait_s if isinstance(exc, RateLimitedError) else float(exc.retry_after_s)
            code = getattr(grpc.StatusCode, exc.grpc_code)
            context.set_trailing_metadata((
                ("retry-after", str(exc.retry_after_s)),
                ("grpc-retry-pushback-ms", str(math.ceil(wait_s * 1000))),
                ("grpc-status-details-bin", retry_status(code.value[0], exc.message, wait_s))))
        if exc.grpc_code == "INTERNAL":
            await context.abort(grpc.StatusCode.INTERNAL, _internal(request, exc))
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL), exc.message)

    async def server_live(self, request: Any, context: Any, metadata: Any) -> Any:
        return pb.ServerLiveResponse(live=self.engine.live())

    async def server_ready(self, request: Any, context: Any, metadata: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.engine.ready())

    async def model_ready(self, request: Any, context: Any, metadata: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version or None))

    async def server_metadata(self, request: Any, context: Any, metadata: Any) -> Any:
        meta = self.engine.metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def model_metadata(self, request: Any, context: Any, metadata: Any) -> Any:
        meta = self.engine.model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    async def model_config(self, request: Any, context: Any, metadata: Any) -> Any:
        # The dict REST's /config answers, read field by field: a key ModelConfig lacks is an error.
        config = self.engine.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def model_infer(self, request: Any, context: Any, metadata: Any) -> Any:
        started = time.perf_counter()
        engine = self.engine
        name, version = request.model_name, request.model_version or None
        check = engine.input_check(name, version)
        heads, big = read_heads(request, check)
        if big:  # decoded on a thread, in steps, so the event loop keeps answering
            loop = asyncio.get_running_loop()
            decoded = await loop.run_in_executor(self._decoder, read_tensors, request, heads, check)
        else:
            decoded = read_tensors(request, heads, check)
        headers = None
        if engine.traffic.routes:  # a route's sticky key may be in the metadata
            if metadata is None:
                metadata = context.invocation_metadata()
            headers = {str(k): str(v) for k, v in metadata or ()}
        result = await engine.infer(name, version, decoded, protocol="grpc", started=started, headers=headers)
        context.set_trailing_metadata((("modelpod-variant", result.variant or result.model_name),
                                       *response_headers()))
        return encode_infer(result, decoded)  # a routed answer's id is the one feedback names

    def handler(self) -> Any:
        def unary(fn: Rpc, req: Any, resp: Any, scope: str | None, model: Callable[[Any], str] | None = None,
                  traced: str = "") -> Any:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(fn, scope, model, traced), request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString)

        def name(r: Any) -> str:
            return str(r.name)

        def model_name(r: Any) -> str:
            return str(r.model_name)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse, None),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse, None),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse, READ, name),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse, READ),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse, READ,
                                   name),
            "ModelConfig": unary(self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse, READ, name),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse, INFER, model_name,
                                traced=INFER_METHOD),
        })


def _internal(request: Any, exc: BaseException) -> str:
    """An INTERNAL status: details and traceback to the log under a request id; the message names the id."""
    rid = getattr(request, "id", "") or uuid.uuid4().hex[:16]
    detail = getattr(exc, "detail", "") or (exc.message if isinstance(exc, ModelpodError) else repr(exc))
    log.error("grpc request failed", exc_info=exc, extra={"fields": {"error": detail, "request_id": rid}})
    what = exc.message if isinstance(exc, ModelpodError) else "internal server error"
    return f"{what} (request id {rid}; the server log has the details)"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def retry_status(code: int, message: str, wait_s: float) -> bytes:
    """A ``google.rpc.Status`` carrying a ``google.rpc.RetryInfo`` (the standard rich error detail for
    "retry after"), encoded by hand: the grpc extra has no googleapis protos."""
    seconds, nanos = int(wait_s), int((wait_s - int(wait_s)) * 1e9)
    duration = (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")
    retry_info = _field(1, duration)
    detail = _field(1, b"type.googleapis.com/google.rpc.RetryInfo") + _field(2, retry_info)
    return b"\x08" + _varint(code) + _field(2, message.encode()) + _field(3, detail)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The grpc core channel arguments bounding what clients may hold (see the module docstring)."""
    def ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),  # answers are not capped over REST either
        ("grpc.max_metadata_size", settings.max_header_bytes),
        # Streams per connection. grpc core counts a stream until the server has freed it, which the
        # Python side does a loop turn or two after the client saw its answer; a stream beyond the
        # count is refused (REFUSED_STREAM), even from a client that keeps to the advertised limit.
        # That count is core's defence against rapid reset (CVE-2023-44487) and stays on: the limit
        # is set well above the calls one client holds (the default, 1024, is the RPC cap).
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.server_handshake_timeout_ms", ms(settings.header_timeout_s)),
        ("grpc.max_connection_idle_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.max_connection_age_ms", ms(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.grpc_max_connection_age_grace_s)),
        ("grpc.keepalive_time_ms", ms(settings.grpc_keepalive_time_s)),  # pings while calls are open
        ("grpc.keepalive_timeout_ms", ms(settings.grpc_keepalive_timeout_s)),
        ("grpc.http2.max_ping_strikes", 2),  # a client pinging too often: GOAWAY (too_many_pings)
        ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared silently
    ]


async def start_grpc(engine: InferenceEngine, settings: Settings, host: str, port: int, *,
                     auth: Auth | None = None, tls: TlsFiles | None = None) -> tuple[Any, int]:
    """Start a grpc.aio server in the running loop; returns (server, bound port). Tokens and TLS
    come from ``settings`` unless given (the server shares one Auth, so rate limits span protocols)."""
    for name in ("grpc_max_concurrent_rpcs", "grpc_max_concurrent_streams", "grpc_keepalive_time_s",
                 "grpc_keepalive_timeout_s", "grpc_max_connection_age_s", "grpc_max_connection_age_grace_s",
                 "grpc_default_deadline_s"):
        if not getattr(settings, name) > 0:
            raise UsageError(f"{name} must be positive (MODELPOD_{name.upper()}), got {getattr(settings, name)!r}")
    tls = tls if tls is not None else TlsFiles.from_settings(settings)
    server = aio.server(options=server_options(settings), maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs)
    server.add_generic_rpc_handlers((GrpcService(engine, settings, auth).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address) if tls is None else server.add_secure_port(
            address, tls.grpc_credentials())
    except RuntimeError as exc:
        raise UsageError(f"cannot listen for gRPC on {address}: {exc}") from None
    if not bound:
        raise UsageError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server, int(bound)
