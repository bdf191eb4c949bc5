"""A lean HTTP/1.1 server: httptools parses, asyncio (uvloop) moves bytes, one handler answers.

Why not an ASGI server: the inference hot path is a small JSON body in and out, and the ASGI
message dance costs more than the inference itself for small models. This keeps keep-alive,
pipelining (answered in order), ``Expect: 100-continue``, a body cap that answers 413 before
reading the body, header limits, idle timeouts and graceful draining, and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger("modelpod.serving")

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class Request:
    """One parsed request. Header names are lower case; the body is complete."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "received", "reject")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
                 keep_alive: bool, received: float, reject: int = 0) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.received = received
        self.reject = reject  # an HTTP status decided while parsing (413, 431): answer it, close


class Response:
    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes | list[bytes] = b"", content_type: str = "application/json",
                 headers: list[tuple[str, str]] | None = None, close: bool = False) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.close = close


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, *, max_body_bytes: int, keepalive_timeout_s: float = 75.0) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[_Connection] = set()
        self.active = 0  # requests handed to the handler and not yet written back
        self.draining = False
        self.date = b""
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._idle: list[asyncio.Future[None]] = []

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._tick()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=2048,
                                                reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def _tick(self) -> None:
        """Once a second: refresh the Date header, close connections idle past the keep-alive timeout."""
        loop = asyncio.get_running_loop()
        self.date = f"date: {formatdate(usegmt=True)}\r\nserver: modelpod\r\n".encode()
        now = loop.time()
        for conn in list(self.connections):
            if not conn.busy and now - conn.last_active > self.keepalive_timeout_s:
                conn.close()
        self._ticker = loop.call_later(1.0, self._tick)

    def begin_drain(self) -> None:
        """Answers from now on close their connection; the socket keeps listening (new calls get 503)."""
        self.draining = True

    def request_done(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle:
            for fut in self._idle:
                if not fut.done():
                    fut.set_result(None)
            self._idle.clear()

    async def wait_idle(self) -> None:
        if self.active == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(fut)
        await fut

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.size = 0
        self.started = 0.0
        # An early answer (413/431): the rest of that message is read and dropped, then we close.
        self.rejected = False
        self.reject_written = False
        self.reject_read = False
        self.pending: deque[Request] = deque()
        self.busy = False
        self.closed = False
        self.paused_reading = False
        self.last_active = self.loop.time()
        self.writable: asyncio.Future[None] | None = None

    # -- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self.reject_read:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # -- parser callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.header_bytes = 0
        self.body = []
        self.size = 0
        self.rejected = False
        self.started = time.perf_counter()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            if not self.rejected:
                self._reject(431)
            return
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.rejected:
            return
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._reject(413)
        elif self.headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.rejected:
            return
        self.size += len(body)
        if self.size > self.server.max_body_bytes:
            self.body = []
            self._reject(413)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.rejected:
            self.reject_read = True
            if self.reject_written:
                self.close()
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._dispatch(self._request(body))

    # -- answering --------------------------------------------------------------------------------
    def _request(self, body: bytes, reject: int = 0) -> Request:
        url = self.url
        if url[:1] != b"/":
            url = httptools.parse_url(url).path or b"/"
        path, _, query = url.partition(b"?")
        return Request(self.parser.get_method().decode("ascii", "replace"), path.decode("latin-1"),
                       query.decode("latin-1"), self.headers, body,
                       self.parser.should_keep_alive() and not reject, self.started, reject)

    def _reject(self, status: int) -> None:
        """Answer now (in order after anything pipelined), discard the rest of the message, close."""
        self.rejected = True
        self._dispatch(self._request(b"", reject=status))
        # Stop reading a body nobody wants after a while; the client has its answer by then.
        self.loop.call_later(10.0, self.close)

    def _dispatch(self, request: Request) -> None:
        if self.busy:
            self.pending.append(request)
            if len(self.pending) > MAX_PIPELINED and self.transport is not None and not self.paused_reading:
                self.transport.pause_reading()
                self.paused_reading = True
            return
        self.busy = True
        self.server.active += 1
        self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        while True:
            try:
                if request.reject:
                    response = error_response(request.reject, HTTPStatus(request.reject).phrase.lower(), close=True)
                else:
                    response = await self.server.handler(request)
            except Exception:
                log.exception("unhandled error in the HTTP handler")
                response = error_response(500, "internal server error")
            if self.writable is not None:
                await self.writable
            keep = self._write(request, response)
            self.server.request_done()
            if request.reject:
                self.reject_written = True
            if not keep:
                # After an early answer, close once the unwanted body is read, or the client
                # may never see the answer (a close with unread data resets the connection).
                if not request.reject or self.reject_read:
                    self.close()
                self.pending.clear()
                break
            if not self.pending:
                break
            request = self.pending.popleft()
            self.server.active += 1
            if self.paused_reading and len(self.pending) < MAX_PIPELINED // 2 and self.transport is not None:
                self.transport.resume_reading()
                self.paused_reading = False
        self.busy = False
        self.last_active = self.loop.time()

    def _write(self, request: Request, response: Response) -> bool:
        keep = request.keep_alive and not response.close and not self.server.draining and not self.closed
        if self.closed or self.transport is None:
            return False
        body = response.body
        length = len(body) if isinstance(body, bytes) else sum(len(b) for b in body)
        head = [
            _STATUS.get(response.status) or f"HTTP/1.1 {response.status} Unknown\r\n".encode(),
            self.server.date,
            b"content-type: ", response.content_type.encode(), b"\r\ncontent-length: ", str(length).encode(),
            b"\r\n" if keep else b"\r\nconnection: close\r\n",
        ]
        if response.headers:
            for name, value in response.headers:
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"\r\n")
        if request.method == "HEAD":
            pass
        elif isinstance(body, bytes):
            head.append(body)
        else:
            head.extend(body)
        self.transport.write(b"".join(head))
        return keep

    def _fail(self, status: int, message: str) -> None:
        if self.transport is not None and not self.closed:
            response = error_response(status, message, close=True)
            self._write(Request("GET", "/", "", {}, b"", False, 0.0), response)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


def error_response(status: int, message: str, *, headers: list[tuple[str, str]] | None = None,
                   close: bool = False) -> Response:
    """An OIP error body: ``{"error": "..."}``."""
    import orjson

    return Response(status, orjson.dumps({"error": message}), headers=headers, close=close)

