"""OIP v2 gRPC (``inference.GRPCInferenceService``) on grpc.aio, in the server's own event loop.

Inputs arrive as typed ``contents`` or as ``raw_input_contents``; the answer uses the same form
(raw whenever the request was raw, or an output is FP16/BF16, which only travel raw). Errors map
to status codes through ``ModelpodError.grpc_code``. Every answer carries the trailing
metadata ``modelpod-variant: NAME:VERSION``; a route's sticky key is read from the invocation
metadata. gRPC is an optional extra: importing this module without grpcio raises
MissingExtraError with the install hint.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from modelpod.errors import InvalidRequestError, MissingExtraError, ModelpodError, OverloadedError, UsageError

try:
    import grpc
    from grpc import aio
except ImportError as exc:  # pragma: no cover - exercised where grpcio is missing
    raise MissingExtraError("grpc", "grpcio", "the gRPC endpoint") from exc

from modelpod.inputs import MAX_DIMS, STEP, InputCheck, check_shape
from modelpod.pod import DATATYPES, Signature, datatype_of
from modelpod.protocols._generated import open_inference_pb2 as pb
from modelpod.protocols.codec import tensor_from_bytes, tensor_to_bytes
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

    def __init__(self, engine: InferenceEngine, settings: Settings) -> None:
        self.engine = engine
        self.token = settings.token.encode() if settings.token else None
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix="modelpod-grpc-decode")

    def _authorize(self, context: Any) -> None:
        if self.token is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, given = str(value).partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
                    return
        raise _Unauthenticated()

    def _wrap(self, fn: Rpc, public: bool = False) -> Rpc:
        async def call(request: Any, context: Any) -> Any:
            try:
                if not public:
                    self._authorize(context)
                return await fn(request, context)
            except _Unauthenticated:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            except ModelpodError as exc:
                if isinstance(exc, OverloadedError):
                    context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
                if exc.grpc_code == "INTERNAL":
                    await context.abort(grpc.StatusCode.INTERNAL, _internal(request, exc))
                await context.abort(getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL), exc.message)
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
        context.set_trailing_metadata((("modelpod-variant", result.variant or result.model_name),))
        msg = encode_infer(result, decoded)
        if result.id:  # a routed answer always has one, for feedback
            msg.id = result.id
        return msg

    def handler(self) -> Any:
        def unary(fn: Rpc, req: Any, resp: Any, public: bool = False) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(fn, public), request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse, public=True),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse, public=True),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        })


def _internal(request: Any, exc: BaseException) -> str:
    """An INTERNAL status: details and traceback to the log under a request id; the message names the id."""
    rid = getattr(request, "id", "") or uuid.uuid4().hex[:16]
    detail = getattr(exc, "detail", "") or (exc.message if isinstance(exc, ModelpodError) else repr(exc))
    log.error("grpc request failed", exc_info=exc, extra={"fields": {"error": detail, "request_id": rid}})
    what = exc.message if isinstance(exc, ModelpodError) else "internal server error"
    return f"{what} (request id {rid}; the server log has the details)"


class _Unauthenticated(Exception):
    pass


async def start_grpc(engine: InferenceEngine, settings: Settings, host: str, port: int) -> tuple[Any, int]:
    """Start a grpc.aio server in the running loop; returns (server, bound port)."""
    server = aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared silently
    ])
    server.add_generic_rpc_handlers((GrpcService(engine, settings).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise UsageError(f"cannot listen for gRPC on {address}: {exc}") from None
    if not bound:
        raise UsageError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server, int(bound)
