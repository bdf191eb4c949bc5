"""The records of an HTTP exchange: the limits a connection works under, a request, a response, the Date.

Kept apart from the server (protocols/http.py) so the handlers (rest, v1, routes) and the tests
import what they build and read without the connection machinery.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelpod.settings import Settings


@dataclass(frozen=True)
class HttpLimits:
    """What one connection (and all of them together) may hold; see protocols/http.py."""

    max_request_line_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    max_pipelined_bytes: int = 1024 * 1024
    max_connections: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                from modelpod.errors import UsageError

                raise UsageError(f"{f.name} must be positive (MODELPOD_{f.name.upper()}), got {value!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class Request:
    """One parsed request. Header names are lower case; the body is complete."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "peer", "query", "reason", "received", "reject")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
                 keep_alive: bool, received: float, reject: int = 0, reason: str = "", peer: str = "") -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.received = received
        self.reject = reject  # an HTTP status decided by the connection (408, 413, 431...): answer it, close
        self.reason = reason
        self.peer = peer  # the client's address ("" when unknown): the console serves loopback peers only


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


def error_response(status: int, message: str, *, headers: list[tuple[str, str]] | None = None,
                   close: bool = False) -> Response:
    """An OIP error body: ``{"error": "..."}``."""
    import orjson

    return Response(status, orjson.dumps({"error": message}), headers=headers, close=close)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(when: float | None = None) -> str:
    """The Date header's IMF-fixdate (RFC 9110), as ``email.utils.formatdate(usegmt=True)`` writes it,
    without importing the email package into every server."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
