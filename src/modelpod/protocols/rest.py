"""OIP v2 REST: routes, auth, JSON and the binary tensor extension, translated to the engine.

Routes (each ``/v2/models/{m}`` route also takes ``/versions/{v}``, an integer or an alias)::

    GET  /v2/health/live  /v2/health/ready  /v2  /v2/
    GET  /v2/models/{m}  /v2/models/{m}/ready  /v2/models/{m}/config   (Triton's model configuration)
    POST /v2/models/{m}/infer
    POST /v2/repository/index  /v2/repository/models/{m}[/versions/{v}]/load  .../unload
    GET  /metrics
    /v1/models/...  the KServe v1 / TensorFlow Serving REST protocol (modelpod.protocols.v1)
    /v2/routes[/{r}[/report|/rollout|/rollback]]  POST /v2/models/{r}/feedback   (protocols/routes.py)

Every inference answer carries ``modelpod-variant: NAME:VERSION`` (the version that answered).

Errors are ``{"error": "..."}`` with the status the ModelpodError carries. With a token (or a
token file: scopes, models, rate limits; protocols/auth.py), every route but the health checks
needs ``Authorization: Bearer <token>`` with the route's scope: 401 without a known token, 403
outside its scopes or models, 429 + Retry-After over its rate. The repository routes need
a token whenever the server listens beyond loopback; without one they answer 401 there. On
loopback without a token they refuse (403) a ``Host`` that is not a loopback name (DNS rebinding)
and an ``Origin`` other than the server's own (a web page), and with or without a token they take
JSON only (415 for any other ``Content-Type``; none at all is read as JSON, as tritonclient sends).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import orjson

from modelpod.errors import (
    ForbiddenError,
    InferenceError,
    InvalidRequestError,
    ModelNotReadyError,
    ModelpodError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from modelpod.inputs import InputCheck, release
from modelpod.observe.serving import traced_rest
from modelpod.protocols import bigjson, v1
from modelpod.protocols.auth import EVERY_MODEL, INFER, MANAGE, READ, Auth
from modelpod.protocols.codec import decode_plain, decode_request, encode_response
from modelpod.protocols.http import Request, Response, error_response
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.messages import InferRequest, InferResult
from modelpod.serving.metrics import CONTENT_TYPE
from modelpod.serving.registry import ModelEntry
from modelpod.settings import Settings

log = logging.getLogger("modelpod.serving")

_EMPTY = Response(200, b"")
# Bodies larger than this are decoded on a thread, off the event loop.
OFF_LOOP_BYTES = 256 * 1024
_HEALTH = ("/v2/health/live", "/v2/health/ready")
_TRACED = ("/v2/models/", "/v1/models/")  # inference and model routes get a server span when tracing


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_name(host: str) -> bool:
    """Whether a ``Host`` header (name or address, with or without a port) names this machine."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    # *.localhost is loopback by RFC 6761, and browsers resolve it so without asking DNS.
    return host.endswith(".localhost") or is_loopback(host)


def _keep_id(req: Request, request: InferRequest) -> None:
    """The body's ``id`` becomes the request's id (unless a header gave one), so the response and
    the log line carry it."""
    if request.id is not None and "x-request-id" not in req.headers:
        req.headers["x-request-id"] = request.id


def _safe_id(value: str | None) -> str | None:
    """A request id fit to echo in a header (printable ASCII, at most 256 characters)."""
    if value and len(value) <= 256 and value.isascii() and value.isprintable():
        return value
    return None


class RestApp:
    """The HTTP handler: ``await app(request) -> response``."""

    def __init__(self, engine: InferenceEngine, settings: Settings, auth: Auth | None = None) -> None:
        self.engine = engine
        self.auth = auth if auth is not None else Auth.from_settings(settings)
        if self.auth is not None:
            self.auth.attach(engine.metrics)
        self.loopback = is_loopback(settings.host)
        self.max_depth = settings.max_json_depth
        self.max_body = settings.max_body_bytes
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix="modelpod-decode")
        self._tasks: set[asyncio.Task[None]] = set()  # begin's calls to a model not ready yet

    async def __call__(self, req: Request) -> Response:
        tracing = self.engine.observe.tracing
        if tracing is not None and req.path.startswith(_TRACED):
            return await traced_rest(tracing, req, self._answer)
        return await self._answer(req)

    async def _answer(self, req: Request) -> Response:
        try:
            response = await self._route(req)
        except Exception as exc:
            response = self._failure(req, exc)
        return self._finished(req, response)

    def begin(self, req: Request, respond: Callable[[Response], None]) -> Response | bool:
        """An inference call answered without a task or coroutine (the HTTP server's fast path): True
        when ``respond(response)`` will be called once, later, on the loop; a Response when the answer
        is known at once (an error); False for any other request, which ``await self(req)`` answers."""
        if (req.method != "POST" or not req.path.startswith("/v2/models/") or len(req.body) > OFF_LOOP_BYTES
                or "content-encoding" in req.headers or self.engine.observe.tracing is not None):
            return False
        try:
            name, version, action = _model_path(req.path[len("/v2/models/"):])
            if action != "infer":
                return False
            self._authorize(req, INFER, name)
            resolved = self.engine.resolve(name, version)  # 404 before any decoding
            request = self._decode(req, self.engine.input_check(resolved))
            _keep_id(req, request)

            def done(result: InferResult | None, error: BaseException | None) -> None:
                try:
                    response = self._inferred(result, request) if result is not None else self._failure(
                        req, error or InferenceError("no result"))
                except Exception as exc:
                    response = self._failure(req, exc)
                respond(self._finished(req, response))

            if self.engine.submit(name, version, request, done, protocol="rest", started=req.received,
                                  headers=req.headers, resolved=resolved):
                return True
        except Exception as exc:
            return self._finished(req, self._failure(req, exc))
        # The model is not ready (loaded on demand, unloading): the engine's awaited path says what to do.
        task = asyncio.get_running_loop().create_task(self._infer_decoded(req, name, version, request, respond))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _infer_decoded(self, req: Request, name: str, version: str | None, request: InferRequest,
                             respond: Callable[[Response], None]) -> None:
        try:
            result = await self.engine.infer(name, version, request, protocol="rest", started=req.received,
                                             headers=req.headers)
            response = self._inferred(result, request)
        except Exception as exc:
            response = self._failure(req, exc)
        respond(self._finished(req, response))

    def _failure(self, req: Request, exc: BaseException) -> Response:
        return self._error(exc, req) if isinstance(exc, ModelpodError) else self._internal(req, exc)

    def _finished(self, req: Request, response: Response) -> Response:
        """The answer as sent: with the request's id echoed, logged at debug level."""
        rid = _safe_id(req.headers.get("x-request-id"))
        if rid is not None:
            response = Response(response.status, response.body, response.content_type,
                                [*(response.headers or ()), ("x-request-id", rid)], response.close)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"fields": {
                "method": req.method, "path": req.path, "status": response.status, "request_id": rid,
                "seconds": round(time.perf_counter() - req.received, 6)}})
        return response

    # -- routing ----------------------------------------------------------------------------------
    async def _route(self, req: Request) -> Response:
        path, method = req.path, req.method
        if path.startswith("/v2/models/"):
            name, version, action = _model_path(path[len("/v2/models/"):])
            if action == "infer":
                _allow(method, "POST")
                self._authorize(req, INFER, name)
                return await self._infer(req, name, version)
            if action == "feedback" and version is None:
                _allow(method, "POST")
                self._authorize(req, INFER, name)
                if self.auth is None and self.loopback:
                    self._same_site(req)  # feedback drives rollouts: no web page may send it
                return _json(self.engine.traffic.feedback(name, self._json(req.body)))
            _allow(method, "GET")
            self._authorize(req, READ, name)
            if action == "":
                return _json(self.engine.model_metadata(name, version))
            if action == "ready":
                if self.engine.model_ready(name, version):
                    return _EMPTY
                reason = self.engine.unready_reason(name, version)
                if reason:  # a failed model says why (e.g. its replicas' last stderr lines)
                    return error_response(503, f"model {name} is not ready: {reason}")
                return Response(503, b"", headers=[("retry-after", "1")])
            if action == "config":
                return _json(self.engine.model_config(name, version))
            if action == "drift":  # per-feature drift against the pod's reference (docs/observe.md)
                return _json(await self.engine.drift(name, version))
            raise NotFoundError(f"no route {path}")
        if path in _HEALTH:
            _allow(method, "GET")
            ok = self.engine.live() if path == _HEALTH[0] else self.engine.ready()
            return _EMPTY if ok else Response(503, b"", headers=[("retry-after", "1")])
        if path in ("/v2", "/v2/"):
            _allow(method, "GET")
            self._authorize(req, READ)
            return _json(self.engine.metadata())
        if path == "/metrics":
            _allow(method, "GET")
            self._authorize(req, READ, EVERY_MODEL)
            return Response(200, self.engine.metrics.render(), CONTENT_TYPE)
        if path.startswith("/v1/"):  # KServe v1 / TensorFlow Serving REST, onto the same engine
            return await v1.handle(self, req)
        if path == "/v2/routes" or path.startswith("/v2/routes/"):
            from modelpod.protocols.routes import routes_api

            self._authorize_management(req, _route_name(path))
            return await routes_api(self.engine, req, self._json)
        if path.startswith("/v2/repository/"):
            _allow(method, "POST")
            self._authorize_management(req, _repository_model(path))
            return await self._repository(req, path[len("/v2/repository/"):])
        raise NotFoundError(f"no route {path}")

    def _authorize(self, req: Request, scope: str, model: str | None = None) -> None:
        """With tokens: the request's token must have ``scope`` (on ``model``) and be within its rate."""
        if self.auth is not None:
            self.auth.check(req.headers.get("authorization"), scope, model)

    def _authorize_management(self, req: Request, model: str) -> None:
        """The guard of every route that changes what the server serves (repository, routes)."""
        ctype = req.headers.get("content-type")
        if ctype is not None and ctype.partition(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaTypeError(f"the management API takes application/json bodies, not {ctype!r}")
        if self.auth is not None:
            self._authorize(req, MANAGE, model)  # a valid token is enough, from any origin
            return
        if not self.loopback:
            raise UnauthorizedError(
                "the repository API needs a token when the server listens beyond loopback: start it with --token")
        self._same_site(req)

    def _same_site(self, req: Request) -> None:
        """On loopback without a token: refuse a foreign ``Host`` (DNS rebinding) or ``Origin`` (a web page)."""
        host = req.headers.get("host")
        if host is not None and not is_loopback_name(host):
            raise ForbiddenError(f"without a token this server answers changes only to a loopback Host, not {host!r}")
        origin = req.headers.get("origin")
        if origin is not None and (host is None or origin.strip().lower() not in (
                f"http://{host.strip().lower()}", f"https://{host.strip().lower()}")):
            raise ForbiddenError(f"changes from another origin ({origin!r}) need the token: start the server "
                                 "with --token")

    # -- inference --------------------------------------------------------------------------------
    async def _infer(self, req: Request, name: str, version: str | None) -> Response:
        resolved = self.engine.resolve(name, version)  # 404 before any decoding
        check = self.engine.input_check(resolved)
        entry: ModelEntry | None = resolved
        if len(req.body) > OFF_LOOP_BYTES or "content-encoding" in req.headers:
            # Big bodies are decoded on a thread in bounded steps, so health checks keep answering.
            loop = asyncio.get_running_loop()
            request = await loop.run_in_executor(self._decoder, self._decode, req, check)
            entry = None  # it may have been unloaded or replaced meanwhile: the engine looks again
        else:
            request = self._decode(req, check)
        _keep_id(req, request)
        result = await self.engine.infer(name, version, request, protocol="rest", started=req.received,
                                         headers=req.headers, resolved=entry)
        return self._inferred(result, request)

    @staticmethod
    def _inferred(result: InferResult, request: InferRequest) -> Response:
        """The answer to an inference request: JSON, or a JSON header and binary tails."""
        out, tails = encode_response(result.model_name, result.model_version, result.outputs, request)
        if result.id is not None:  # a routed answer always has one (made here if need be), for feedback
            out["id"] = result.id
        data = orjson.dumps(out)
        variant = ("modelpod-variant", result.variant or result.model_name)
        if tails:
            return Response(200, [data, *tails], "application/octet-stream",
                            [("inference-header-content-length", str(len(data))), variant])
        return Response(200, data, headers=[variant])

    def _decode(self, req: Request, check: InputCheck) -> InferRequest:
        """The request body (inflated, JSON header, binary tail) as tensors checked against ``check``."""
        body = self._decoded(req)
        header_length = req.headers.get("inference-header-content-length")
        tail: memoryview | None = None
        if header_length is not None:
            # ASCII digits only: "²".isdigit() is true, and int("١") is 1.
            if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
                raise InvalidRequestError(f"Inference-Header-Content-Length {header_length!r} does not fit the body")
            n = int(header_length)
            tail = memoryview(body)[n:]
            body = body[:n]
        if len(body) <= OFF_LOOP_BYTES:
            obj = self._json(body)
            plain = decode_plain(obj, check, tail)
            return plain if plain is not None else decode_request(obj, tail, check)
        # Only here (on the decoding thread): parsed in steps, object count and depth capped first.
        n_in, n_out = len(check.signature.inputs), len(check.signature.outputs)
        obj = bigjson.loads(body, 2 * (n_in + n_out) + 66 if check.typed else 100_000, self.max_depth)
        del body
        try:
            return decode_request(obj, tail, check)
        finally:  # free the parsed lists here, in steps, not wherever the last reference drops
            for t in obj.get("inputs") or () if isinstance(obj, dict) else ():
                if isinstance(t, dict):
                    release(t.get("data"))

    def _decoded(self, req: Request) -> bytes:
        encoding = req.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("identity", ""):
            return req.body
        if encoding not in ("gzip", "deflate"):
            raise InvalidRequestError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
        data, rest = b"", req.body
        while True:  # gzip allows several members one after another
            inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
            try:
                part = inflater.decompress(rest, self.max_body + 1 - len(data))
            except zlib.error as exc:
                raise InvalidRequestError(f"the {encoding} body is corrupt: {exc}") from None
            data = data + part if data else part
            if len(data) > self.max_body or inflater.unconsumed_tail:
                raise PayloadTooLargeError(f"the decoded body is larger than {self.max_body} bytes")
            if not inflater.eof:
                raise InvalidRequestError(f"the {encoding} body is corrupt: the stream is cut short")
            rest = inflater.unused_data
            if not rest:
                return data
            if encoding != "gzip":
                raise InvalidRequestError("the deflate body is corrupt: data after the end of the stream")

    def _json(self, data: bytes) -> Any:
        return bigjson.loads_small(data, self.max_depth)

    # -- repository -------------------------------------------------------------------------------
    async def _repository(self, req: Request, rest: str) -> Response:
        body = self._json(req.body) if req.body.strip() else {}
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        if rest == "index":
            return _json(self.engine.repository_index(ready_only=bool(body.get("ready", False))))
        parts = rest.split("/")
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            name = unquote(parts[1])
            if parts[2] == "load":
                if body.get("parameters"):
                    raise InvalidRequestError(
                        "load parameters (configs, files) are not accepted: load a packed model by store name")
                await self.engine.load_model(name)
            else:
                await self.engine.unload_model(name)
            return _EMPTY
        if len(parts) == 5 and parts[0] == "models" and parts[2] == "versions" and parts[4] in ("load", "unload"):
            name, version = unquote(parts[1]), unquote(parts[3])  # one version (a route's old variant)
            if parts[4] == "load":
                await self.engine.load_model(f"{name}:{version}" if version.isdigit() else f"{name}@{version}")
            else:
                await self.engine.unload_model(name, version)
            return _EMPTY
        raise NotFoundError(f"no route /v2/repository/{rest}")

    # -- errors -----------------------------------------------------------------------------------
    def _error(self, exc: ModelpodError, req: Request) -> Response:
        headers: list[tuple[str, str]] = []
        if isinstance(exc, OverloadedError):
            headers.append(("retry-after", str(exc.retry_after_s)))
        elif isinstance(exc, ModelNotReadyError):
            headers.append(("retry-after", "1"))
        elif isinstance(exc, UnauthorizedError):
            headers.append(("www-authenticate", 'Bearer realm="modelpod"'))
        elif isinstance(exc, _MethodNotAllowed):
            headers.append(("allow", exc.allow))
        status = exc.http_status
        if status == 500:
            return self._internal(req, exc)
        if status > 500 and status not in (503, 504):
            log.error("request failed", extra={"fields": {
                "path": req.path, "status": status, "error": exc.message,
                "request_id": _safe_id(req.headers.get("x-request-id"))}})
        elif status == 504:
            log.warning("request timed out", extra={"fields": {
                "path": req.path, "request_id": _safe_id(req.headers.get("x-request-id"))}})
        return error_response(status, exc.message, headers=headers or None)

    def _internal(self, req: Request, exc: BaseException) -> Response:
        """A 500: the detail and traceback go to the log under the request id; the body names the id only."""
        rid = request_id(req.headers)
        detail = getattr(exc, "detail", "") or (exc.message if isinstance(exc, ModelpodError) else repr(exc))
        log.error("request failed", exc_info=exc, extra={"fields": {
            "path": req.path, "status": 500, "error": detail, "request_id": rid}})
        what = exc.message if isinstance(exc, ModelpodError) else "internal server error"
        return error_response(500, f"{what} (request id {rid}; the server log has the details)")


def request_id(headers: dict[str, str]) -> str:
    """The request's id (``X-Request-ID`` or the body's ``id``), or a new one, stored in ``headers``."""
    rid = _safe_id(headers.get("x-request-id"))
    if rid is None:
        rid = uuid.uuid4().hex[:16]
        headers["x-request-id"] = rid
    return rid


class _MethodNotAllowed(InvalidRequestError):
    http_status = 405

    def __init__(self, method: str, allow: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allow}")
        self.allow = allow


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise _MethodNotAllowed(method, allowed)


def _route_name(path: str) -> str:
    """The route a ``/v2/routes[/{r}...]`` path names (EVERY_MODEL for the list)."""
    parts = path[len("/v2/routes"):].strip("/").split("/")
    return unquote(parts[0]) if parts[0] else EVERY_MODEL


def _repository_model(path: str) -> str:
    """The model a ``/v2/repository/models/{m}/...`` path names (EVERY_MODEL for the index)."""
    parts = path[len("/v2/repository/"):].split("/")
    return unquote(parts[1]) if len(parts) > 2 and parts[0] == "models" and parts[1] else EVERY_MODEL


def _model_path(rest: str) -> tuple[str, str | None, str]:
    """``m[/versions/v][/action]`` -> (name, version, action)."""
    parts = rest.split("/")
    name = unquote(parts[0])
    if not name:
        raise NotFoundError("no model name in the path")
    i = 1
    version: str | None = None
    if len(parts) >= 3 and parts[1] == "versions":
        version = unquote(parts[2]) or None
        i = 3
    action = parts[i] if len(parts) > i else ""
    if len(parts) > i + 1 and any(parts[i + 1:]):
        raise NotFoundError(f"no route /v2/models/{rest}")
    return name, version, action


def _json(obj: Any) -> Response:
    return Response(200, orjson.dumps(obj))
