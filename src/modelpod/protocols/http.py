"""A lean HTTP/1.1 server: httptools parses, asyncio (uvloop) moves bytes, one handler answers.

Why not an ASGI server: the inference hot path is a small JSON body in and out, and the ASGI
message dance costs more than the inference itself for small models. This keeps keep-alive,
pipelining (answered in order), ``Expect: 100-continue``, a body cap answered (413) before the
body is read, graceful draining, and bounds on what one client can hold (``HttpLimits``):
request-line and header bytes counted as they arrive (414, 431); the head within
``header_timeout_s`` of the request's first byte and all of it within ``body_timeout_s`` (408); a
write deadline for clients that stop reading; pipelined bodies capped per connection (reading
pauses, as uvicorn does, and resumes once they drain); 503 + Retry-After over ``max_connections``.

A refusal is answered in order after what was pipelined before it, with ``connection: close``.
After any answer that closes (a refusal, HTTP/1.0, ``Connection: close``, draining) the server
half-closes and drops the client's remaining input for a while (closing with unread input would
reset the connection and could lose the answer). An inference call is answered without a task
when the handler's ``begin`` takes it (protocols/rest.py); anything else in a task that awaits
the handler, one request at a time per connection, in order. A client that half-closes
after its requests gets every answer. No timer per request: one sweep a second checks each
connection's two deadlines. The connection itself (parser callbacks, answering, closing) is
protocols/connection.py.

HTTPS: with ``tls`` (an ``ssl.SSLContext``) the port is protocols/tls.py's ``TlsListener``: a
plain-HTTP client gets a 400 naming https://, handshakes are counted and must end within
``header_timeout_s``, then the connection is this same code over asyncio's TLS transport. The
plain path is untouched. Over TLS a refusal closes at once (TLS has no half-close).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from modelpod.protocols.connection import Begin, CertConnection, Connection
from modelpod.protocols.wire import Handler, HttpLimits, Request, Response, error_response, http_date

if TYPE_CHECKING:
    from modelpod.protocols.tls import TlsListener

__all__ = ["Handler", "HttpLimits", "HttpServer", "Request", "Response", "error_response"]

log = logging.getLogger("modelpod.serving")


class HttpServer:
    def __init__(self, handler: Handler, *, max_body_bytes: int, keepalive_timeout_s: float = 75.0,
                 limits: HttpLimits | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        # The handler's fast path, when it has one: begin(request, respond) -> True (respond is called
        # later), a Response (answered at once) or False (awaited in a task, as every request once was).
        self.begin: Begin | None = getattr(handler, "begin", None)
        self.tls = tls  # HTTPS (protocols/tls.py); the handshake must end within the header timeout
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.limits = limits or HttpLimits()
        self.connections: set[Connection] = set()
        self.open = 0  # connections within max_connections
        self.refused = 0  # connections over the cap since the last tick
        self.active = 0  # requests handed to the handler and not yet written back
        self.draining = False
        self.date = b""
        self._server: asyncio.AbstractServer | None = None
        self._listener: TlsListener | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._idle: list[asyncio.Future[None]] = []

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._tick()
        if self.tls is not None:
            from modelpod.protocols.tls import TlsListener

            # Mutual TLS asks for a certificate without requiring it in the handshake (a failed
            # handshake closes without a word): a client without one gets a 401 saying so, or health.
            kind = CertConnection if self.tls.verify_mode != ssl.CERT_NONE else Connection
            self._listener = TlsListener(lambda: kind(self), self.tls, self.limits.header_timeout_s,
                                         self.limits.max_connections)
            return await self._listener.start(host, port)
        self._server = await loop.create_server(lambda: Connection(self), host, port, backlog=2048,
                                                reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def _tick(self) -> None:
        """Once a second: refresh the Date header and check every connection's deadlines."""
        loop = asyncio.get_running_loop()
        self.date = f"date: {http_date()}\r\nserver: modelpod\r\n".encode()
        now = loop.time()
        for conn in list(self.connections):
            conn.sweep(now)
        if self.refused:
            log.warning("connections refused: over the cap", extra={"fields": {
                "refused": self.refused, "max_connections": self.limits.max_connections}})
            self.refused = 0
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
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
