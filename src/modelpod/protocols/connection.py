"""One HTTP/1.1 connection of protocols/http.py's server: httptools' callbacks, the limits counted
as bytes arrive, in-order answers (through the handler's ``begin`` when it takes a request, else a
task awaiting the handler), the staged close, and the once-a-second deadline sweep."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

import httptools

from modelpod.protocols.wire import Request, Response, error_response

if TYPE_CHECKING:
    from modelpod.protocols.http import HttpServer

log = logging.getLogger("modelpod.serving")

MAX_PIPELINED = 32  # requests queued behind a busy one before reading pauses
LINGER_S = 5.0  # after a refusal: how long the rest of the input is read and dropped
_NEVER = math.inf
_IDLE, _HEAD, _BODY = 0, 1, 2
# Headers a request may carry once: two are ambiguous (which host? whose credentials? which length?).
_SINGLE = frozenset({"host", "authorization", "content-length", "content-type", "content-encoding",
                     "inference-header-content-length", "origin", "expect"})
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # for probes, without a client certificate
Begin = Callable[[Request, Callable[[Response], None]], "Response | bool"]
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class _Stop(Exception):
    """Raised from a parser callback: stop parsing this connection and answer ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_NO_REQUEST = Request("GET", "/", "", {}, b"", False, 0.0)


class Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.size = 0
        self.started = 0.0  # perf_counter at the request's first byte (for latency)
        self.began = 0.0  # loop time at the request's first byte (for deadlines)
        self.phase = _IDLE
        self.seq = 0  # requests begun on this connection
        self.read_deadline = _NEVER
        self.write_deadline = _NEVER
        self.stop: _Stop | None = None
        self.discard = False  # after a refusal: read and drop all further input
        self.counted = False
        self.pending: deque[Request] = deque()
        self.pending_bytes = 0
        self.busy = False
        self.current = _NO_REQUEST  # the request being answered (one at a time, in order)
        self.inside = False  # in the parser or the handler's begin: an answer now would come too early
        self.closed = False
        self.eof = False
        self.paused_reading = False
        self.writable: asyncio.Future[None] | None = None
        self.peer = ""

    # -- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = str(peername[0])
        server = self.server
        server.connections.add(self)
        now = self.loop.time()
        if server.open >= self.limits.max_connections:
            server.refused += 1
            self._write(_NO_REQUEST, error_response(503, "too many connections; try again shortly",
                                                    headers=[("retry-after", "1")], close=True))
            self._linger(1.0)
            return
        self.counted = True
        server.open += 1
        # A new connection gets the head deadline for its first byte, a kept-alive one the idle timeout.
        self.read_deadline = now + min(self.limits.header_timeout_s, server.keepalive_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.counted:
            self.counted = False
            self.server.open -= 1
        self.pending.clear()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it sent (True keeps our side open), then close."""
        self.eof = True
        if self.busy and not self.closed and self.server.tls is None:  # TLS has no half-close
            return True
        self.closed = True
        return None

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()
        self.write_deadline = self.loop.time() + self.limits.write_timeout_s

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None
        if not self.closed:
            self.write_deadline = _NEVER

    def data_received(self, data: bytes) -> None:
        if self.discard:
            return
        phase, seq, before = self.phase, self.seq, self.head_bytes
        self.inside = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            stop, self.stop = self.stop, None
            if stop is None:  # one of our callbacks failed: a bug, not the client's fault
                log.exception("HTTP parser callback failed")
                self._refuse(500, "internal server error")
            else:
                self._refuse(stop.status, stop.reason)
            return
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        finally:
            self.inside = False
        if self.phase == _HEAD and phase == _HEAD and self.seq == seq:
            # All of this chunk is part of a head begun earlier; httptools holds an unfinished header
            # line inside, unseen, so count the chunk here.
            self.head_bytes = before + len(data)
            if self.head_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"the request headers are larger than {self.limits.max_header_bytes} bytes")

    # -- parser callbacks -------------------------------------------------------------------------
    def _halt(self, status: int, reason: str) -> None:
        self.stop = _Stop(status, reason)
        raise self.stop

    def on_message_begin(self) -> None:
        self.seq += 1
        self.phase = _HEAD
        self.url = b""
        self.headers = {}
        self.head_bytes = 0
        self.body = []
        self.size = 0
        self.started = time.perf_counter()
        self.began = now = self.loop.time()
        self.read_deadline = now + self.limits.header_timeout_s

    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if self.url:
            url = self.url + url
        if len(url) > self.limits.max_request_line_bytes:
            self._halt(414, f"the request target is longer than {self.limits.max_request_line_bytes} bytes")
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.max_header_bytes:
            self._halt(431, f"the request headers are larger than {self.limits.max_header_bytes} bytes")
        key = name.decode("latin-1").lower()
        headers = self.headers
        if key in headers:
            if key in _SINGLE:
                self._halt(400, f"more than one {key} header")
            headers[key] += ", " + value.decode("latin-1")
        else:
            headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.phase = _BODY
        self.read_deadline = self.began + self.limits.body_timeout_s
        headers = self.headers
        if "host" not in headers and self.parser.get_http_version() not in ("1.0", "0.9"):
            self._halt(400, "an HTTP/1.1 request needs a Host header")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._halt(413, f"the body is larger than {self.server.max_body_bytes} bytes")
        expect = headers.get("expect")
        # 100 Continue: only to HTTP/1.1 clients, and not while an earlier answer is still to come
        # (it would land in the middle of that answer; the client sends its body after a wait).
        if (expect is not None and expect.lower() == "100-continue" and not self.busy
                and self.transport is not None and self.parser.get_http_version() == "1.1"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        size = self.size + len(body)
        if size > self.server.max_body_bytes:
            self.body = []
            self._halt(413, f"the body is larger than {self.server.max_body_bytes} bytes")
        self.size = size
        self.body.append(body)
        if self.busy and not self.paused_reading and size + self.pending_bytes > self.limits.max_pipelined_bytes:
            self._pause()

    def on_message_complete(self) -> None:
        self.phase = _IDLE
        self.read_deadline = _NEVER
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._dispatch(self._request(body))

    # -- answering --------------------------------------------------------------------------------
    def _request(self, body: bytes) -> Request:
        url = self.url
        if url[:1] != b"/":
            try:
                url = httptools.parse_url(url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                self._halt(400, "malformed request target")
        path, _, query = url.partition(b"?")
        return Request(self.parser.get_method().decode("ascii", "replace"), path.decode("latin-1"),
                       query.decode("latin-1"), self.headers, body, self.parser.should_keep_alive(),
                       self.started, peer=self.peer)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` in order after what is pipelined, read nothing more, close after."""
        if self.discard or self.closed:
            return
        self.discard = True
        self.read_deadline = _NEVER  # until the answer is out; then the linger deadline
        self._dispatch(Request("GET", "/", "", {}, b"", False, self.started, status, reason))

    def _dispatch(self, request: Request) -> None:
        if self.busy:
            self.pending.append(request)
            self.pending_bytes += len(request.body)
            if not self.paused_reading and (len(self.pending) > MAX_PIPELINED
                                            or self.pending_bytes > self.limits.max_pipelined_bytes):
                self._pause()
            return
        self.busy = True
        self.server.active += 1
        self._start(request)

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self.paused_reading = True

    def _resume(self) -> None:
        self.paused_reading = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self.phase != _IDLE:  # the client waited on us: its request gets time again
                self.read_deadline = max(self.read_deadline, self.loop.time() + self.limits.header_timeout_s)

    def _start(self, request: Request) -> None:
        """Answer ``request``: through the handler's begin when it takes it (no task), else in a task."""
        self.current = request
        begin = self.server.begin
        if begin is not None and not request.reject:
            inside, self.inside = self.inside, True
            try:
                taken = begin(request, self._answered)
            except Exception:
                log.exception("unhandled error in the HTTP handler")
                taken = error_response(500, "internal server error")
            finally:
                self.inside = inside
            if taken is True:
                return
            if taken is not False:
                assert isinstance(taken, Response)
                self.loop.call_soon(self._answered, taken, request)
                return
        self.loop.create_task(self._serve(request))

    def _answered(self, response: Response, request: Request | None = None) -> None:
        """The handler's answer to the current request (begin's ``respond``)."""
        if request is None:
            request = self.current
            if self.inside:  # answered within begin or the parser: after them, in order
                self.loop.call_soon(self._answered, response, request)
                return
        if request is not self.current:
            log.error("an HTTP answer came for a request not being answered; dropped")
            return
        if self.writable is not None:  # the client is not reading: wait for it, in a task
            self.loop.create_task(self._send_later(request, response))
            return
        self._sent(request, response)

    async def _send_later(self, request: Request, response: Response) -> None:
        """Write the answer once the client reads again (at once if it never stopped)."""
        if self.writable is not None:
            await self.writable
        self._sent(request, response)

    async def _serve(self, request: Request) -> None:
        if request.reject:
            headers = [("retry-after", "1")] if request.reject == 503 else None
            response = error_response(request.reject, request.reason or HTTPStatus(request.reject).phrase,
                                      headers=headers, close=True)
        else:
            try:
                response = await self.server.handler(request)
            except Exception:
                log.exception("unhandled error in the HTTP handler")
                response = error_response(500, "internal server error")
        await self._send_later(request, response)

    def _sent(self, request: Request, response: Response) -> None:
        """Write one answer; then start the next pipelined request, or wait for the next one."""
        self.current = _NO_REQUEST
        keep = self._write(request, response)
        self.server.request_done()
        if request.reject or not keep:
            # A staged close (RFC 9112, 9.6): half-close, then read and drop what the client still
            # sends; closing with its input unread would reset the connection, and a reset can
            # reach the client before the answer it was sent with.
            self._linger(LINGER_S)
        elif self.pending:
            request = self.pending.popleft()
            self.pending_bytes -= len(request.body)
            self.server.active += 1
            if (self.paused_reading and not self.discard and len(self.pending) <= MAX_PIPELINED // 2
                    and self.pending_bytes <= self.limits.max_pipelined_bytes // 2):
                self._resume()
            self._start(request)
            return
        self.busy = False
        if self.closed or self.discard:
            return
        if self.eof:
            self.close()
            return
        if self.paused_reading:
            self._resume()
        if self.phase == _IDLE:
            self.read_deadline = self.loop.time() + self.server.keepalive_timeout_s

    def _write(self, request: Request, response: Response) -> bool:
        if self.closed or self.transport is None:
            return False
        keep = (request.keep_alive and not response.close and not self.server.draining
                and not (self.eof and not self.pending))
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

    def _linger(self, seconds: float) -> None:
        """After a refusal: half-close, read and drop what still comes, close after ``seconds``."""
        self.pending.clear()
        self.pending_bytes = 0
        if self.closed or self.transport is None:
            return
        if self.eof:
            self.close()
            return
        self.discard = True
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.close()
            return
        self.read_deadline = self.loop.time() + seconds
        if self.paused_reading:
            self._resume()

    def sweep(self, now: float) -> None:
        """The once-a-second check of this connection's deadlines."""
        if now > self.write_deadline:  # the client has not read our answer for write_timeout_s
            self.abort()
        elif now > self.read_deadline and not self.closed and not (self.paused_reading and not self.discard):
            if self.discard or self.phase == _IDLE:
                self.close()  # idle past the keep-alive timeout, or the linger after a refusal is over
            else:
                self._refuse(408, "the request did not arrive in time")

    def abort(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.pending.clear()
            self.pending_bytes = 0
            self.transport.close()
            # close() waits for the write buffer to drain; a client that never reads is aborted.
            if self.write_deadline == _NEVER:
                self.write_deadline = self.loop.time() + self.limits.write_timeout_s


class CertConnection(Connection):
    """A mutual-TLS connection: without a client certificate only the health checks answer (probes)."""

    certified = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.certified = bool(transport.get_extra_info("peercert"))
        super().connection_made(transport)

    def _request(self, body: bytes) -> Request:
        request = super()._request(body)
        if not self.certified and request.path not in OPEN_PATHS:
            self._halt(401, "this server requires a client certificate (mutual TLS) signed by its client CA; "
                       "the connection presented none")
        return request
