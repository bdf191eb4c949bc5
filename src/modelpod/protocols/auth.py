"""Bearer tokens: who may call what (scopes, models) and how often (a token bucket per token).

A token file (``--token-file`` / ``MODELPOD_TOKEN_FILE``) holds either one token (the whole file:
every scope, every model, no rate limit, as ``--token``) or a YAML table::

    rate: 50            # requests/s for every token without its own (optional; none: unlimited)
    burst: 100          # how many may come at once (default: the rate, at least 1)
    tokens:
      - name: churn-app                # shown in errors and logs instead of the token
        sha256: 9f86d081884c7d65...    # the hex SHA-256 of the token; or  token: <clear text>
        scopes: [infer]                # infer, read, manage
        models: [churn]                # optional: only these models (or routes)
        rate: 5                        # or  rate_limit: {rate: 5, burst: 10}
        burst: 10

Scopes: ``infer`` (inference, feedback), ``read`` (metadata, readiness, config, ``/metrics``),
``manage`` (the repository and routes APIs). The health checks (live, ready) need no token. A
token limited to models may not use what covers every model (``/metrics``, the repository
index, the list of routes). Tokens are looked up by their SHA-256 digest, so the file need not
hold one in clear and no comparison takes longer for a better guess; no token is ever logged.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpod.errors import ForbiddenError, RateLimitedError, UnauthorizedError, UsageError

if TYPE_CHECKING:
    from modelpod.serving.metrics import Counter, ServingMetrics
    from modelpod.settings import Settings

INFER, READ, MANAGE = "infer", "read", "manage"
SCOPES = (INFER, READ, MANAGE)
EVERY_MODEL = "*"  # what an endpoint covering every model passes as its model
WRONG_TOKEN = "missing or wrong bearer token"
REFUSALS = "modelpod_auth_refusals_total"
_RECENT = 256  # good Authorization values remembered
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TABLE = re.compile(r"^tokens[ \t]*:", re.MULTILINE)


@dataclass
class Bucket:
    """A token bucket: ``rate`` requests/s on average, at most ``burst`` at once."""

    rate: float
    burst: float
    level: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """Take one request: 0.0 when allowed, else the seconds until one would be."""
        if self.level < 0:
            self.level, self.stamp = self.burst, now
        level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if level >= 1.0:
            self.level = level - 1.0
            return 0.0
        self.level = level
        return (1.0 - level) / self.rate


@dataclass(frozen=True)
class Grant:
    """What one token may do."""

    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None  # None: every model
    bucket: Bucket | None = field(default=None, compare=False)


def digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Auth:
    """The tokens a server accepts; ``check`` answers who is calling or raises 401/403/429."""

    def __init__(self, grants: Mapping[bytes, Grant], clock: Callable[[], float] = time.monotonic) -> None:
        self.grants = dict(grants)
        self.clock = clock
        self.refusals: Counter | None = None
        # Authorization values seen to be good -> their grant: a dict lookup instead of parsing and
        # hashing on every request (SHA-256 alone costs about as much as the rest of the check).
        self._recent: dict[str, Grant] = {}

    def attach(self, metrics: ServingMetrics) -> None:
        """Count refusals in ``modelpod_auth_refusals_total{reason, token}`` (the token's name; "" unknown)."""
        from modelpod.serving.metrics import Counter

        family = next((f for f in metrics.registry.families if f.name == REFUSALS), None)
        if family is None:
            family = Counter(REFUSALS, "Requests refused by the token check, by reason and token name.",
                             ("reason", "token"))
            metrics.registry.add(family)
        assert isinstance(family, Counter)
        self.refusals = family

    def _refused(self, reason: str, grant: Grant | None) -> None:
        if self.refusals is not None:
            self.refusals.labels(reason, grant.name if grant is not None else "").inc()

    @classmethod
    def single(cls, token: str) -> Auth:
        """One token with every scope, every model and no rate limit (``--token``)."""
        return cls({digest(token): Grant("the server token", frozenset(SCOPES))})

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth | None:
        """The server's tokens: ``settings.token``, or the table in ``settings.token_file``; None: open."""
        if settings.token is not None:
            return cls.single(settings.token)
        if settings.token_file is not None:
            return cls.from_file(settings.token_file)
        return None

    @classmethod
    def from_file(cls, path: Path) -> Auth:
        """A token file: a YAML table (``tokens:``), or else one token."""
        from modelpod.settings import read_token_file

        text = read_token_file(path)
        table = token_table(text, str(path))
        if table is None:
            return cls.single(text)
        return cls(parse_table(table, str(path)))

    def check(self, credential: str | None, scope: str, model: str | None = None) -> Grant:
        """The grant of ``credential`` (an Authorization value) for ``scope`` on ``model``; raises
        UnauthorizedError (no or unknown token), ForbiddenError (scope or model) or RateLimitedError."""
        grant = self._recent.get(credential) if credential is not None else None
        if grant is None:
            token = bearer(credential)
            grant = self.grants.get(digest(token)) if token is not None else None
            if grant is None or credential is None:
                self._refused("unauthenticated", None)
                raise UnauthorizedError(WRONG_TOKEN)
            if len(self._recent) >= _RECENT:
                self._recent.clear()
            self._recent[credential] = grant
        if scope not in grant.scopes:
            self._refused("scope", grant)
            raise ForbiddenError(f"token {grant.name!r} has no {scope!r} scope (it has "
                                 f"{', '.join(sorted(grant.scopes))})")
        if grant.models is not None and model is not None:
            if model == EVERY_MODEL or model not in grant.models:
                self._refused("model", grant)
            if model == EVERY_MODEL:
                raise ForbiddenError(f"token {grant.name!r} is limited to models {', '.join(sorted(grant.models))}; "
                                     "this endpoint covers every model")
            if model not in grant.models:
                raise ForbiddenError(f"token {grant.name!r} may not use model {model!r}")
        if grant.bucket is not None:
            wait = grant.bucket.take(self.clock())
            if wait > 0:
                self._refused("rate_limited", grant)
                when = f"{wait:.2f}" if wait < 10 else f"{wait:.0f}"
                raise RateLimitedError(
                    f"token {grant.name!r} is over its rate limit of {grant.bucket.rate:g} requests/s "
                    f"(burst {grant.bucket.burst:g}); retry in {when}s",
                    retry_after_s=max(1, math.ceil(wait)), wait_s=wait)
        return grant


def token_table(text: str, where: str = "the token file") -> dict[str, Any] | None:
    """The YAML table of a token file's text (a line ``tokens:``), or None when it holds one token."""
    if _TABLE.search(text) is None:
        return None
    import yaml

    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"token file {where}: not valid YAML{at}") from None  # the text may hold tokens
    if not isinstance(obj, dict):
        raise UsageError(f"token file {where}: a table of tokens must be a mapping with 'tokens:'")
    return obj


def parse_table(table: Mapping[str, Any], where: str) -> dict[bytes, Grant]:
    """The grants of a token table; a mistake is a UsageError naming ``where`` and the entry
    (by its name or index, never by its token)."""
    unknown = set(table) - {"tokens", "rate", "burst", "rate_limit"}
    if unknown:
        raise UsageError(f"token file {where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(expected tokens, rate, burst)")
    entries = table.get("tokens")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"token file {where}: 'tokens' must be a non-empty list")
    default_rate, default_burst = _rate(table, f"token file {where}")
    grants: dict[bytes, Grant] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        grant, key = _entry(entry, i, where, default_rate, default_burst)
        if key in grants:
            raise UsageError(f"token file {where}: {grant.name!r} repeats the token of {grants[key].name!r}")
        if grant.name in names:
            raise UsageError(f"token file {where}: two tokens are named {grant.name!r}")
        names.add(grant.name)
        grants[key] = grant
    return grants


def _entry(entry: Any, i: int, where: str, default_rate: float | None,
           default_burst: float | None) -> tuple[Grant, bytes]:
    label = f"token file {where}: tokens[{i}]"
    if not isinstance(entry, dict):
        raise UsageError(f"{label} must be a mapping with token or sha256, and scopes")
    name = entry.get("name")
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{label}: name must be a non-empty string")
        label = f"token file {where}: token {name!r}"
    unknown = set(entry) - {"name", "token", "sha256", "scopes", "models", "rate", "burst", "rate_limit"}
    if unknown:
        raise UsageError(f"{label}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(expected name, token or sha256, scopes, models, rate, burst)")
    clear, hashed = entry.get("token"), entry.get("sha256")
    if (clear is None) == (hashed is None):
        raise UsageError(f"{label}: give token or sha256, exactly one")
    if clear is not None:
        if not isinstance(clear, str) or not clear.strip() or clear != clear.strip():
            raise UsageError(f"{label}: token must be a non-empty string without surrounding spaces")
        key = digest(clear)
    else:
        text = str(hashed).strip().lower().removeprefix("sha256:")
        if not _HEX64.fullmatch(text):
            raise UsageError(f"{label}: sha256 must be 64 hex digits (printf %s TOKEN | sha256sum)")
        key = bytes.fromhex(text)
    scopes = _words(entry.get("scopes"), f"{label}: scopes")
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        raise UsageError(f"{label}: scopes must be one or more of {', '.join(SCOPES)}"
                         + (f", not {', '.join(bad)}" if bad else ""))
    models = entry.get("models")
    allowed = frozenset(_words(models, f"{label}: models")) if models is not None else None
    if allowed is not None and not allowed:
        raise UsageError(f"{label}: models must name at least one model (leave it out for every model)")
    rate, burst = _rate(entry, label)
    if rate is None:
        rate, burst = default_rate, burst if burst is not None else default_burst
    bucket = Bucket(rate, burst if burst is not None else max(1.0, rate)) if rate is not None else None
    if bucket is not None and bucket.burst < 1:
        raise UsageError(f"{label}: burst must be at least 1")
    return Grant(name or f"sha256:{key.hex()[:12]}", frozenset(scopes), allowed, bucket), key


def _rate(obj: Mapping[str, Any], label: str) -> tuple[float | None, float | None]:
    """``rate`` and ``burst``, or the same as ``rate_limit: {rate, burst}`` (or ``rate_limit: N``)."""
    nested = obj.get("rate_limit")
    if nested is None:
        return _number(obj.get("rate"), f"{label}: rate"), _number(obj.get("burst"), f"{label}: burst")
    if "rate" in obj or "burst" in obj:
        raise UsageError(f"{label}: give rate/burst or rate_limit, not both")
    if not isinstance(nested, dict):
        return _number(nested, f"{label}: rate_limit"), None
    keys = set(nested) - {"rate", "burst"}
    if keys:
        raise UsageError(f"{label}: rate_limit takes rate and burst, not {', '.join(sorted(map(str, keys)))}")
    return (_number(nested.get("rate"), f"{label}: rate_limit.rate"),
            _number(nested.get("burst"), f"{label}: rate_limit.burst"))


def _words(value: Any, label: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"{label} must be a list of names")
    return list(value)


def _number(value: Any, label: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise UsageError(f"{label} must be a positive number, got {value!r}")
    return float(value)
