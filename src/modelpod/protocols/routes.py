"""The routes extension over REST: live management of traffic splits, and feedback.

    GET    /v2/routes                       every route, as ``GET /v2/routes/{name}`` shows it
    GET    /v2/routes/{name}                the spec (same schema as the YAML), weights in force, status,
                                            the rollout (running or last) and the recorded rollbacks
    PUT    /v2/routes/{name}                create or replace (variants not loaded are loaded first)
    DELETE /v2/routes/{name}                remove the route (its models stay served)
    GET    /v2/routes/{name}/report         per-variant numbers and the comparison with the baseline
    POST   /v2/routes/{name}/rollout        start a progressive rollout
    POST   /v2/routes/{name}/rollback       back to the last completed state
    POST   /v2/models/{name}/feedback       ``{"id", "reward"}`` or ``{"id", "label"}``

The management routes are authorized like the repository extension (rest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import orjson

from modelpod.errors import InvalidRequestError, NotFoundError, UsageError
from modelpod.protocols.http import Request, Response, error_response
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.routes import parse_route

Parse = Callable[[bytes], Any]
# What GET adds to the spec: a PUT of a GET's answer ignores these (what it would set stays the spec).
READ_ONLY = ("name", "status", "weights", "share", "models", "rollout", "events", "rollbacks_available")


class _MethodNotAllowed(Exception):
    def __init__(self, method: str, allow: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allow}")
        self.allow = allow


def _ok(obj: Any) -> Response:
    return Response(200, orjson.dumps(obj))


def _body(req: Request, parse: Parse) -> Any:
    if not req.body.strip():
        return {}
    return parse(req.body)


async def routes_api(engine: InferenceEngine, req: Request, parse: Parse) -> Response:
    """Answer one ``/v2/routes[/...]`` request; errors raise ModelpodError (rest.py encodes them)."""
    try:
        return await _answer(engine, req, parse)
    except _MethodNotAllowed as exc:
        return error_response(405, str(exc), headers=[("allow", exc.allow)])


async def _answer(engine: InferenceEngine, req: Request, parse: Parse) -> Response:
    traffic = engine.traffic
    parts = [unquote(p) for p in req.path[len("/v2/routes"):].strip("/").split("/") if p]
    method = "GET" if req.method == "HEAD" else req.method
    if not parts:
        _allow(method, ("GET",))
        return _ok([traffic.describe(n) for n in sorted(traffic.routes)])
    name = parts[0]
    if len(parts) == 1:
        _allow(method, ("GET", "PUT", "DELETE"))
        if method == "GET":
            return _ok(traffic.describe(name))
        if method == "DELETE":
            await traffic.delete(name)
            return _ok({"deleted": name})
        body = _body(req, parse)
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in READ_ONLY}
        try:
            spec = parse_route(name, body)
        except UsageError as exc:
            raise InvalidRequestError(exc.message) from None
        await traffic.apply(spec)
        return _ok(traffic.describe(name))
    if len(parts) == 2:
        action = parts[1]
        if action == "report":
            _allow(method, ("GET",))
            return _ok(traffic.report(name))
        if action == "rollout":
            _allow(method, ("POST",))
            await traffic.start_rollout(name, _body(req, parse))
            return _ok(traffic.describe(name))
        if action == "rollback":
            _allow(method, ("POST",))
            await traffic.rollback(name)
            return _ok(traffic.describe(name))
    raise NotFoundError(f"no route {req.path}")


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise _MethodNotAllowed(method, ", ".join(allowed))
