"""OIP v2 gRPC (``inference.GRPCInferenceService``) on grpc.aio, in the server's own event loop.

Inputs arrive as typed ``contents`` or as ``raw_input_contents``; the answer uses the same form
(raw whenever the request was raw, or an output is FP16/BF16, which only travel raw). Errors map
to status codes through ``ModelpodError.grpc_code``. Every answer carries the trailing
metadata ``modelpod-variant: NAME:VERSION``; a route's sticky key is read from the invocation
metadata. gRPC is an optional extra: importing this module without grpcio raises
MissingExtraError with the install hint.

Tokens as over REST (protocols/auth.py): ``authorization: Bearer <token>`` metadata; a call without a
known token is UNAUTHENTICATED, outside its scopes or models PERMISSION_DENIED, over its rate
RESOURCE_EXHAUSTED with ``retry-after`` (seconds), ``grpc-retry-pushback-ms`` and a ``google.rpc.RetryInfo``
in ``grpc-status-details-bin``. The
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

import numpy as np

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

from modelpod.inputs import MAX_DIMS, STEP, InputCheck, check_shape
from modelpod.observe.context import response_headers
from modelpod.observe.serving import traced_grpc
from modelpod.pod import DATATYPES, Signature, datatype_of
from modelpod.protocols._generated import open_inference_pb2 as pb
from modelpod.protocols.auth import INFER, READ, Auth
from modelpod.protocols.codec import tensor_from_bytes, tensor_to_bytes
from modelpod.protocols.tls import TlsFiles
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.messages import InferRequest, InferResult
from modelpod.settings import Settings

log = logging.getLogger("modelpod.serving")

SERVICE = "inference.GRPCInferenceService"
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
Rpc = Callable[[Any, "aio.ServicerContext[Any, Any]"], Awaitable[Any]]


# The numpy type each typed-contents field arrives as (protobuf's own scalar types).
_WIRE = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
         "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
         "fp64_contents": np.float64}


def _parameter(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def decode_infer(msg: Any, check: InputCheck | None = None) -> InferRequest:
    """A ModelInferRequest as the engine's InferRequest; with ``check``, headers are checked first."""
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidRequestError(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs")
    if not msg.inputs:
        raise InvalidRequestError("the request has no inputs")
    check = check or InputCheck(Signature())
    if check.typed and len(msg.inputs) > len(check.signature.inputs):
        check.names((), len(msg.inputs))  # raises: more inputs than the model takes
    heads: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for i, t in enumerate(msg.inputs):
        name, datatype = t.name, t.datatype
        if not name:
            raise InvalidRequestError(f"inputs[{i}] has no name")
        if name in seen:
            raise InvalidRequestError(f"input {name!r} given twice")
        seen.add(name)
        if datatype not in DATATYPES:
            raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r}")
        if len(t.shape) > MAX_DIMS:
            raise InvalidRequestError(f"input {name!r}: {len(t.shape)} dimensions; at most {MAX_DIMS} are allowed")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequestError(f"input {name!r}: negative dimension in shape {list(shape)}")
        check.header(name, datatype, shape)
        heads.append((name, datatype, shape))
    check.names(seen, len(seen))
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for i, (name, datatype, shape) in enumerate(heads):
        if raw:
            arr = tensor_from_bytes(name, datatype, shape, memoryview(raw[i]))
        else:
            arr = _from_contents(name, datatype, shape, msg.inputs[i].contents)
        inputs[name] = check.finish(name, arr)
    outputs = {o.name: True for o in msg.outputs} or None
    params = {k: _parameter(v) for k, v in msg.parameters.items()}
    return InferRequest(inputs, msg.id or None, params, outputs, binary_output=bool(raw),
                        checked=check.signature if check.typed else None)


def _big(msg: Any) -> bool:
    """Whether decoding ``msg`` is worth a thread: raw tensors over 256 kB, or many typed values."""
    if sum(len(r) for r in msg.raw_input_contents) > 256 * 1024:
        return True
    for t in msg.inputs:
        n = 1
        for d in t.shape:
            n *= max(int(d), 0)
        if n > STEP:
            return True
    return False


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray[Any, Any]:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidRequestError(f"input {name!r}: {datatype} travels only as raw_input_contents")
    values = getattr(contents, field)
    n = check_shape(name, shape)
    if len(values) != n:
        raise InvalidRequestError(f"input {name!r}: {len(values)} values for shape {list(shape)}")
    if datatype == "BYTES":
        arr = np.empty(n, dtype=object)
        for i in range(0, n, STEP):
            arr[i:i + STEP] = list(values[i:i + STEP])
        return arr.reshape(shape)
    # int_contents carries INT8/INT16 as int32: values must fit the declared type, never wrap.
    wide: np.ndarray[Any, Any] = np.empty(n, dtype=_WIRE[field])
    for i in range(0, n, STEP):  # in steps: each numpy call holds the GIL
        wide[i:i + STEP] = values[i:i + STEP]
    want = DATATYPES[datatype]
    if want != wide.dtype and wide.size:
        info = np.iinfo(want)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequestError(f"input {name!r}: values do not fit {datatype}")
    return wide.astype(want).reshape(shape)


def encode_infer(result: InferResult, request: InferRequest) -> Any:
    """The engine's answer as a ModelInferResponse, raw or typed like the request."""
    msg = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version or "",
                                id=request.id or "")
    wanted = request.outputs
    chosen = [(n, np.asarray(a)) for n, a in result.outputs.items() if wanted is None or n in wanted]
    if wanted:
        missing = [n for n in wanted if n not in result.outputs]
        if missing:
            raise InvalidRequestError(f"unknown output(s) {', '.join(missing)}")
    kinds = [(n, a, datatype_of(a)) for n, a in chosen]
    raw = request.binary_output or any(dt not in _CONTENTS for _, _, dt in kinds)
    for name, arr, datatype in kinds:
        out = msg.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        if raw:
            msg.raw_output_contents.append(tensor_to_bytes(arr))
        elif datatype == "BYTES":
            out.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1).tolist())
        else:
            getattr(out.contents, _CONTENTS[datatype]).extend(arr.reshape(-1).tolist())
    return msg


class GrpcService:
    """The RPC implementations; ``handler()`` registers them without generated service code."""

    def __init__(self, engine: InferenceEngine, settings: Settings, auth: Auth | None = None) -> None:
        self.engine = engine
        self.auth = auth if auth is not None else Auth.from_settings(settings)
        if self.auth is not None:
            self.auth.attach(engine.metrics)
        self.deadline_s = settings.grpc_default_deadline_s
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix="modelpod-grpc-decode")

    def _authorize(self, context: Any, scope: str, model: str | None) -> None:
        assert self.auth is not None
        given: list[str] = [str(v) for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(given) > 1:
            raise InvalidRequestError("more than one authorization metadata entry")
        self.auth.check(given[0] if given else None, scope, model)

    def _wrap(self, fn: Rpc, scope: str | None, model: Callable[[Any], str] | None = None, traced: str = "") -> Rpc:
        async def call(request: Any, context: Any) -> Any:
            try:
                if scope is not None and self.auth is not None:
                    self._authorize(context, scope, model(request) if model is not None else None)
                tracing = self.engine.observe.tracing
                if traced and tracing is not None:  # a server span, child of the metadata's traceparent
                    def run() -> Any:
                        if context.time_remaining() is None:  # no deadline from the client: ours
                            return _within(fn(request, context), self.deadline_s)
                        return fn(request, context)
                    return await traced_grpc(tracing, traced, context.invocation_metadata(), run)
                if context.time_remaining() is None:  # no deadline from the client: ours
                    return await _within(fn(request, context), self.deadline_s)
                return await fn(request, context)
            except ModelpodError as exc:
                if isinstance(exc, RateLimitedError):
                    context.set_trailing_metadata((
                        ("retry-after", str(exc.retry_after_s)),
                        ("grpc-retry-pushback-ms", str(math.ceil(exc.wait_s * 1000))),
                        ("grpc-status-details-bin", retry_status(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                                                 exc.message, exc.wait_s))))
                elif isinstance(exc, OverloadedError):
                    context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
                if exc.grpc_code == "INTERNAL":
                    await context.abort(grpc.StatusCode.INTERNAL, _internal(request, exc))
                await context.abort(getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL), exc.message)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the call came without a deadline and took longer than the server's "
                                    f"{self.deadline_s:g}s (MODELPOD_GRPC_DEFAULT_DEADLINE_S); set a deadline")
            except Exception as exc:
                await context.abort(grpc.StatusCode.INTERNAL, _internal(request, exc))
        return call

    async def server_live(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.engine.live())

    async def server_ready(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.engine.ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version or None))

    async def server_metadata(self, request: Any, context: Any) -> Any:
        meta = self.engine.metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def model_metadata(self, request: Any, context: Any) -> Any:
        meta = self.engine.model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    async def model_config(self, request: Any, context: Any) -> Any:
        # The dict REST's /config answers, read field by field: a key ModelConfig lacks is an error.
        config = self.engine.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def model_infer(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        check = self.engine.input_check(request.model_name, request.model_version or None)
        if _big(request):  # decoded on a thread, in steps, so the event loop keeps answering
            loop = asyncio.get_running_loop()
            decoded = await loop.run_in_executor(self._decoder, decode_infer, request, check)
        else:
            decoded = decode_infer(request, check)
        headers = None
        if self.engine.traffic.routes:  # a route's sticky key may be in the metadata
            headers = {str(k): str(v) for k, v in context.invocation_metadata() or ()}
        result = await self.engine.infer(request.model_name, request.model_version or None, decoded,
                                         protocol="grpc", started=started, headers=headers)
        context.set_trailing_metadata((("modelpod-variant", result.variant or result.model_name),
                                       *response_headers()))
        msg = encode_infer(result, decoded)
        if result.id:  # a routed answer always has one, for feedback
            msg.id = result.id
        return msg

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
                                traced=f"/{SERVICE}/ModelInfer"),
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


async def _within(call: Awaitable[Any], seconds: float) -> Any:
    """``await call``, raising TimeoutError after ``seconds``."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(call, seconds)
    async with timeout(seconds):
        return await call


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The grpc core channel arguments bounding what clients may hold (see the module docstring)."""
    def ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),  # answers are not capped over REST either
        ("grpc.max_metadata_size", settings.max_header_bytes),
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
