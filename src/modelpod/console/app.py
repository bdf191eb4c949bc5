"""The console's HTTP side: the page, its static files and its JSON endpoints under ``/console``.

``ConsoleApp`` wraps the REST handler: a path under ``/console`` is answered here, anything else
goes to ``RestApp`` untouched (one prefix test per request, and only with ``--console``).

Who may see it:

- **No token set**: loopback clients only (the peer address), and only under a loopback ``Host``
  (a DNS-rebinding page cannot read it); everyone else gets 403.
- **Token set** (``--token``/``--token-file``, the API's token): every page and endpoint but the
  static files and the login form needs the token, as ``Authorization: Bearer`` or as the
  session cookie the login form sets (HttpOnly, SameSite=Strict, holding an HMAC of the token,
  never the token). An unauthenticated ``GET /console`` gets 401 and the login form.

Nothing here changes server state, and with the console on and no token, a management call
(repository, routes, feedback) that carries an ``Origin`` (a web page's) is refused: the API lets
same-origin pages through on loopback, and the console is the one page of this origin. The try-it
form posts to ``/console/api/models/{m}/infer``, which hands the request to the normal REST
inference path (same decoding, checks, metrics and limits); it needs the console's auth and the
``X-Modelpod-Console`` header, which no cross-site form can send without a CORS preflight this
server never grants.

Endpoints (GET unless said)::

    /console                      the page (or the login form)
    /console/static/{file}        its script and style sheet
    POST /console/login           form field ``token``: sets the session cookie, 303 to /console
    POST /console/logout          clears it
    /console/api/overview         server, models (with versions and state), routes
    /console/api/models, /console/api/routes      those two parts of the overview alone
    /console/api/metrics?since=T  sampled points after T (epoch seconds), the series they hold
    /console/api/errors?since=T&limit=N   recent warnings/errors and non-success answers
    /console/api/models/{m}/example[?version=V]   a request to start the try-it form from
    /console/api/routes/{r}/report                the route's A/B report
    /console/api/sections         the optional sections (drift, replicas) the engine provides
    POST /console/api/models/{m}[/versions/{v}]/infer   try it: the REST inference path
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import orjson

from modelpod.console import views
from modelpod.console.errors import RecentErrors
from modelpod.console.history import History
from modelpod.errors import ForbiddenError, InvalidRequestError, ModelpodError, NotFoundError, UnauthorizedError
from modelpod.protocols.http import Request, Response, error_response
from modelpod.protocols.rest import RestApp, is_loopback_name
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

PREFIX = "/console"
API = PREFIX + "/api/"
COOKIE = "modelpod_console"
HEADER = "x-modelpod-console"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8",
          "login.js": "text/javascript; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_PAGE_HEADERS = [("content-security-policy", _CSP), ("x-content-type-options", "nosniff"),
                 ("x-frame-options", "DENY"), ("referrer-policy", "same-origin"), ("cache-control", "no-store")]
_MAX_LIMIT = 1000


class _MethodNotAllowed(InvalidRequestError):
    http_status = 405

    def __init__(self, method: str, allow: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allow}")
        self.allow = allow


def loopback_peer(peer: str) -> bool:
    """Whether a client address is this machine (IPv4-mapped IPv6 included)."""
    try:
        addr = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _asset(name: str) -> bytes:
    return resources.files("modelpod.console").joinpath("static", name).read_bytes()


class ConsoleApp:
    """The HTTP handler with the console in front of ``rest``: ``await app(request) -> response``."""

    def __init__(self, rest: RestApp, engine: InferenceEngine, settings: Settings, *,
                 history: History | None = None) -> None:
        self.rest = rest
        self.engine = engine
        self.token = settings.token.encode() if settings.token else None
        self.session = (hmac.new(self.token, b"modelpod-console-session", hashlib.sha256).hexdigest()
                        if self.token is not None else "")
        self.history = history or History(engine)
        self.errors = RecentErrors()
        self.started = time.time()
        self.pages = {"index": _asset("index.html"), "login": _asset("login.html")}
        self.assets = {name: _asset(name) for name in ASSETS}

    def start(self) -> None:
        """Begin sampling and collecting errors (call on the server's event loop)."""
        self.errors.attach()
        self.history.start()

    async def close(self) -> None:
        self.errors.detach()
        await self.history.close()

    async def __call__(self, req: Request) -> Response:
        path = req.path
        if path == PREFIX or path.startswith(PREFIX + "/"):
            try:
                return await self._console(req)
            except ModelpodError as exc:
                return self._error(exc)
        if self.token is None and "origin" in req.headers and _changes_state(req):
            # Without a token the API lets same-origin pages manage the server; with the console on,
            # the console is the one page of this origin, and it may change nothing.
            return self._error(ForbiddenError("changes from a web page need the server's token (--token): "
                                              "the console changes nothing"))
        return await self.rest(req)

    def begin(self, req: Request, respond: Callable[[Response], None]) -> Response | bool:
        """The REST app's fast path (``RestApp.begin``) for what this handler would pass it unchanged."""
        path = req.path
        if path == PREFIX or path.startswith(PREFIX + "/") or (
                self.token is None and "origin" in req.headers and _changes_state(req)):
            return False
        return self.rest.begin(req, respond)

    # -- who may see it ---------------------------------------------------------------------------
    def _guard(self, req: Request) -> None:
        if self.token is not None:
            return
        if not loopback_peer(req.peer):
            raise ForbiddenError("the console answers only loopback clients when no token is set: start the server "
                                 "with --token or --token-file to open it beyond this machine")
        host = req.headers.get("host")
        if host is not None and not is_loopback_name(host):
            raise ForbiddenError(f"without a token the console answers only a loopback Host, not {host!r}")

    def _authed(self, req: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token):
            return True
        cookie = _cookie(req.headers.get("cookie", ""), COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.session.encode())

    def _require(self, req: Request) -> None:
        if not self._authed(req):
            raise UnauthorizedError("the console needs the server's token (Authorization: Bearer, or log in at "
                                    "/console)")

    @staticmethod
    def _same_origin(req: Request) -> None:
        """A request that acts (log in, try it) must not come from another site's page."""
        origin = req.headers.get("origin")
        host = (req.headers.get("host") or "").strip().lower()
        if origin is not None and origin.strip().lower() not in (f"http://{host}", f"https://{host}"):
            raise ForbiddenError(f"console requests from another origin ({origin!r}) are refused")

    # -- routing ----------------------------------------------------------------------------------
    async def _console(self, req: Request) -> Response:
        self._guard(req)
        path, method = req.path, req.method
        if path in (PREFIX, PREFIX + "/"):
            _allow(method, "GET")
            if not self._authed(req):
                return self._page("login", 401, [("www-authenticate", 'Bearer realm="modelpod"')])
            return self._page("index")
        if path.startswith(PREFIX + "/static/"):
            _allow(method, "GET")
            name = path[len(PREFIX + "/static/"):]
            if name not in self.assets:
                raise NotFoundError(f"no console file {name!r}")
            return Response(200, self.assets[name], ASSETS[name], [("x-content-type-options", "nosniff"),
                                                                   ("cache-control", "no-cache")])
        if path == PREFIX + "/login":
            _allow(method, "POST")
            return self._login(req)
        if path == PREFIX + "/logout":
            _allow(method, "POST")
            self._same_origin(req)
            return Response(303, b"", "text/plain", [("location", PREFIX), ("set-cookie", self._cookie(""))])
        if path.startswith(API):
            self._require(req)
            return await self._api(req, path[len(API):])
        raise NotFoundError(f"no console page {path}")

    def _login(self, req: Request) -> Response:
        self._same_origin(req)
        if self.token is None:
            return Response(303, b"", "text/plain", [("location", PREFIX)])
        ctype = req.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise InvalidRequestError("log in with the form at /console (application/x-www-form-urlencoded)")
        try:
            form = parse_qs(req.body.decode("utf-8"), max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequestError("the login form is malformed") from None
        token = (form.get("token") or [""])[0].strip().encode()
        if not token or not hmac.compare_digest(token, self.token):
            return Response(303, b"", "text/plain", [("location", PREFIX + "?failed=1")])
        return Response(303, b"", "text/plain", [("location", PREFIX), ("set-cookie", self._cookie(self.session))])

    @staticmethod
    def _cookie(value: str) -> str:
        gone = "; Max-Age=0" if not value else ""
        return f"{COOKIE}={value}; Path={PREFIX}; HttpOnly; SameSite=Strict{gone}"

    async def _api(self, req: Request, rest: str) -> Response:
        parts = rest.split("/")
        if len(parts) >= 3 and parts[0] == "models" and parts[-1] == "infer":
            _allow(req.method, "POST")
            return await self._try(req, parts[1:-1])
        _allow(req.method, "GET")
        query = _query(req.query)
        if rest == "overview":
            _only(query)
            auth = {"auth": "token" if self.token is not None else "loopback",
                    "sample_interval_s": self.history.interval_s}
            return _json({**views.overview(self.engine, self.started), "console": auth})
        if rest in ("models", "routes"):
            _only(query)
            return _json({rest: views.overview(self.engine, self.started)[rest]})
        if rest == "metrics":
            _only(query, "since")
            since = _number(query, "since", 0.0)
            return _json({"interval_s": self.history.interval_s, "now": round(time.time(), 3),
                          "started": round(self.started, 3), "series": self.history.series,
                          "points": self.history.since(since)})
        if rest == "errors":
            _only(query, "since", "limit")
            since = _number(query, "since", 0.0)
            limit = int(_number(query, "limit", 100.0, integer=True, low=1, high=_MAX_LIMIT))
            found = [e for e in (*self.errors.snapshot(), *self.history.events) if e["t"] > since]
            found.sort(key=lambda e: e["t"])
            return _json({"errors": found[-limit:]})
        if rest == "sections":
            _only(query)
            return _json(views.sections(self.engine))
        if len(parts) == 3 and parts[0] == "models" and parts[2] == "example":
            _only(query, "version")
            version = query.get("version")
            return _json(views.example(self.engine, _name(parts[1]), version or None))
        if len(parts) == 3 and parts[0] == "routes" and parts[2] == "report":
            _only(query)
            return _json(views.report(self.engine, _name(parts[1])))
        raise NotFoundError(f"no console endpoint /console/api/{rest}")

    async def _try(self, req: Request, where: list[str]) -> Response:
        """The try-it form: the request goes through the REST inference path as the API's own would."""
        if req.headers.get(HEADER) != "1":
            raise ForbiddenError(f"the try-it endpoint needs the {HEADER}: 1 header (the console page sends it)")
        self._same_origin(req)
        if len(where) == 1:
            target = f"/v2/models/{quote(_name(where[0]), safe='')}/infer"
        elif len(where) == 3 and where[1] == "versions":
            target = f"/v2/models/{quote(_name(where[0]), safe='')}/versions/{quote(_name(where[2]), safe='')}/infer"
        else:
            raise NotFoundError("try it at /console/api/models/{model}[/versions/{version}]/infer")
        headers = {k: v for k, v in req.headers.items() if k not in ("cookie", "authorization")}
        if self.token is not None:  # the caller proved it holds the token (bearer or session)
            headers["authorization"] = "Bearer " + self.token.decode()
        forwarded = Request("POST", target, "", headers, req.body, req.keep_alive, req.received, peer=req.peer)
        return await self.rest(forwarded)

    # -- answers ----------------------------------------------------------------------------------
    def _page(self, name: str, status: int = 200, extra: list[tuple[str, str]] | None = None) -> Response:
        return Response(status, self.pages[name], "text/html; charset=utf-8", [*_PAGE_HEADERS, *(extra or ())])

    @staticmethod
    def _error(exc: ModelpodError) -> Response:
        headers = [("cache-control", "no-store")]
        if isinstance(exc, UnauthorizedError):
            headers.append(("www-authenticate", 'Bearer realm="modelpod"'))
        elif isinstance(exc, _MethodNotAllowed):
            headers.append(("allow", exc.allow))
        return error_response(exc.http_status if 400 <= exc.http_status < 600 else 500, exc.message, headers=headers)


def _changes_state(req: Request) -> bool:
    """A management call: the repository and routes APIs (but reads), and route feedback."""
    if req.method in ("GET", "HEAD"):
        return False
    path = req.path
    return (path.startswith("/v2/repository/") or path == "/v2/routes" or path.startswith("/v2/routes/")
            or (path.startswith("/v2/models/") and path.endswith("/feedback")))


def _json(obj: Any) -> Response:
    return Response(200, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=str),
                    headers=[("cache-control", "no-store"), ("x-content-type-options", "nosniff")])


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise _MethodNotAllowed(method, allowed)


def _name(segment: str) -> str:
    name = unquote(segment)
    if not name:
        raise NotFoundError("no name in the path")
    return name


def _query(text: str) -> dict[str, str]:
    try:
        parsed = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=16)
    except ValueError as exc:
        raise InvalidRequestError(f"malformed query string: {exc}") from None
    for key, values in parsed.items():
        if len(values) > 1:
            raise InvalidRequestError(f"query parameter {key!r} given more than once")
    return {k: v[0] for k, v in parsed.items()}


def _only(query: dict[str, str], *known: str) -> None:
    unknown = sorted(set(query) - set(known))
    if unknown:
        allowed = f"; this endpoint takes {', '.join(known)}" if known else "; this endpoint takes none"
        raise InvalidRequestError(f"unknown query parameter(s) {', '.join(unknown)}{allowed}")


def _number(query: dict[str, str], key: str, default: float, *, integer: bool = False,
            low: float | None = None, high: float | None = None) -> float:
    raw = query.get(key)
    if raw is None:
        return default
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(f"query parameter {key!r} must be {kind}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidRequestError(f"query parameter {key!r} must be finite, got {raw!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(f"query parameter {key!r} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip()
    return None
