"""TLS for REST and gRPC: one set of PEM files, read and checked once at start.

``--tls-cert FILE --tls-key FILE`` (``MODELPOD_TLS_CERT``/``MODELPOD_TLS_KEY``) serve HTTPS and gRPC
over TLS (1.2 at least); ``--tls-client-ca FILE`` (``MODELPOD_TLS_CLIENT_CA``) also requires every
client to present a certificate signed by that CA (mutual TLS): over gRPC in the handshake; over
REST a client without one reaches only the health checks (so HTTPS probes work) and gets a 401
saying why anywhere else, and one with a certificate of another CA fails the handshake (the reason
is logged). A file that
cannot be read, a key that does not match the certificate, or a certificate past its end date
stops the start with the file named. The handshake of a new connection must finish within the
header timeout, and connections not past it are counted (``TlsListener``); a plain-HTTP request to
the TLS port gets a 400 naming https:// (its first byte is no TLS handshake record) and is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from modelpod.errors import UsageError

if TYPE_CHECKING:
    from modelpod.settings import Settings

log = logging.getLogger("modelpod.serving")
LINGER_S = 2.0  # a plain-HTTP client on the TLS port: how long its input is read and dropped after the 400


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of the server's certificate chain, its key and (for mTLS) the client CA."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    cert_path: Path
    key_path: Path
    client_ca_path: Path | None

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """The TLS files of ``settings`` (None: plain), checked: both or neither, readable, matching."""
        cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        if cert is None and key is None:
            if ca is not None:
                raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (MODELPOD_TLS_CERT, MODELPOD_TLS_KEY)")
            return None
        if cert is None or key is None:
            raise UsageError("--tls-cert and --tls-key go together (MODELPOD_TLS_CERT, MODELPOD_TLS_KEY)")
        files = cls(_read(cert, "--tls-cert"), _read(key, "--tls-key"), _read(ca, "--tls-client-ca") if ca else None,
                    cert, key, ca)
        _check_dates(files.cert, cert)
        files.ssl_context()  # the key must match the certificate; the CA must parse
        return files

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for asyncio (REST)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        except ssl.SSLError as exc:
            raise UsageError(f"--tls-cert {self.cert_path} / --tls-key {self.key_path}: {_reason(exc)} "
                             "(is the key the certificate's, both PEM?)") from None
        except OSError as exc:
            raise UsageError(f"--tls-cert {self.cert_path}: cannot read it: {exc.strerror or exc}") from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            except ssl.SSLError as exc:
                raise UsageError(f"--tls-client-ca {self.client_ca_path}: {_reason(exc)} "
                                 "(a PEM CA certificate?)") from None
            # Asked for, checked when given; a client without one reaches only the health checks
            # (protocols/http.py answers it a 401 saying why: a failed handshake would close silently).
            ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def grpc_credentials(self) -> Any:
        """``grpc.ServerCredentials`` of the same files; client certificates required with a client CA."""
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise UsageError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc).replace("_", " ").lower()


def _check_dates(pem: bytes, path: Path) -> None:
    """Refuse a server certificate outside its validity (with ``cryptography``; skipped without it)."""
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - cryptography comes with most installs
        return
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UsageError(f"--tls-cert {path}: not a PEM certificate: {exc}") from None
    now = datetime.now(timezone.utc)
    if cert.not_valid_after_utc < now:
        raise UsageError(f"--tls-cert {path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise UsageError(f"--tls-cert {path}: the certificate is not valid before "
                         f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


_PLAIN_ANSWER = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s")


class TlsListener:
    """The TLS port's accept loop: the first byte tells a TLS client (a handshake record, 0x16) from a
    plain-HTTP one, which gets a 400 saying to use https:// instead of a failed handshake. Connections
    not yet past their handshake are counted (at most ``max_pending``) and dropped after ``timeout_s``."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], ctx: ssl.SSLContext, timeout_s: float,
                 max_pending: int) -> None:
        self.factory = factory
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.pending = 0
        self.socks: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[Any]] = set()
        self.failed = 0
        self._reported = -10.0
        body = b'{"error": "this port speaks HTTPS (TLS): use https://"}'
        self.answer = _PLAIN_ANSWER % (len(body), body)

    async def start(self, host: str, port: int) -> int:
        """Listen on every address ``host`` names (as ``create_server`` does); returns the port."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple[int, Any]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self.socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(self.socks) > 1:  # one port for every address
                    address = (address[0], self.socks[0].getsockname()[1], *address[2:])
                sock.bind(address)
                sock.listen(2048)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._tasks = [loop.create_task(self._accept(sock)) for sock in self.socks]
        return int(self.socks[0].getsockname()[1])

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors, for one: the next accept may do
                log.warning("accept failed on the TLS port", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(0.1)
                continue
            if self.pending >= self.max_pending:
                conn.close()  # too many handshakes at once; a TLS client retries
                continue
            conn.setblocking(False)
            self.pending += 1
            timer = loop.call_later(self.timeout_s, self._drop, conn)
            loop.add_reader(conn.fileno(), self._first_byte, conn, timer)

    def _drop(self, conn: socket.socket) -> None:
        """A connection that sent nothing within the handshake deadline."""
        loop = asyncio.get_running_loop()
        if conn.fileno() >= 0:
            loop.remove_reader(conn.fileno())
            conn.close()
            self.pending -= 1

    def _first_byte(self, conn: socket.socket, timer: asyncio.TimerHandle) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return  # not yet: the reader stays
        except OSError:
            head = b""
        loop.remove_reader(conn.fileno())
        timer.cancel()
        if not head:
            conn.close()
            self.pending -= 1
            return
        if head[0] == 0x16:  # a TLS handshake record: TLS from here, the handshake within the deadline
            task = loop.create_task(loop.connect_accepted_socket(
                self.factory, conn, ssl=self.ctx, ssl_handshake_timeout=self.timeout_s))
        else:
            task = loop.create_task(loop.connect_accepted_socket(lambda: _PlainRefusal(self.answer), conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        self.pending -= 1
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        # A failed handshake (a certificate of another CA, no shared version): the client only sees
        # the connection close, so the reason goes to the log, at most once every 10 s.
        self.failed += 1
        now = asyncio.get_running_loop().time()
        if now - self._reported >= 10.0:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("TLS handshakes failed", extra={"fields": {"count": self.failed, "last_reason": str(reason)}})
            self.failed, self._reported = 0, now

    def close(self) -> None:
        for task in [*self._tasks, *self._handshakes]:
            task.cancel()
        for sock in self.socks:
            sock.close()
        self.socks = []


class _PlainRefusal(asyncio.Protocol):
    """A plain-HTTP client on the TLS port: the 400, a half-close, its input dropped for a while, close."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        if self.transport is not None:
            self.transport.close()
        return None
