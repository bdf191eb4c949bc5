"""Settings: one frozen object per process, built at the edge (CLI flags or ``MODELPOD_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _default_home() -> Path:
    return Path.home() / ".modelpod"


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Library code receives this; it never reads the environment."""

    home: Path = field(default_factory=_default_home)
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None
    # Auth: a bearer token; when set every data-plane call needs it. Management calls need it
    # always when the server listens beyond loopback.
    token: str | None = None
    # A file holding the token (``--token-file``/``MODELPOD_TOKEN_FILE``): not in the process list.
    # Or a YAML table of tokens with scopes, models and rate limits (protocols/auth.py).
    token_file: Path | None = None
    # TLS for REST and gRPC (protocols/tls.py): PEM certificate chain and key; with a client CA,
    # every client must present a certificate it signed (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = 64
    # Per-request deadline for every model (None: each pod's ``serving.timeout_s``).
    request_timeout_s: float | None = None
    drain_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    # HTTP connection bounds (protocols/http.py): bytes counted as they arrive, deadlines per request.
    max_request_line_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0  # request line and headers, from the request's first byte
    body_timeout_s: float = 60.0  # the whole request, from its first byte
    write_timeout_s: float = 30.0  # a client that stops reading our answer is dropped after this
    max_pipelined_bytes: int = 1024 * 1024  # bodies queued behind a busy request, per connection
    max_connections: int = 4096
    # gRPC bounds (protocols/grpc.py); connections, metadata and messages share the HTTP ones.
    grpc_max_concurrent_rpcs: int = 1024  # RPCs in progress at once; more get RESOURCE_EXHAUSTED
    # Per connection (HTTP/2 SETTINGS); keep it well above the calls a client has in flight on one
    # connection: a stream over it is refused (REFUSED_STREAM), see protocols/grpc.py.
    grpc_max_concurrent_streams: int = 1024
    grpc_keepalive_time_s: float = 60.0  # ping a quiet client this often ...
    grpc_keepalive_timeout_s: float = 20.0  # ... and drop it when the ping is not answered in this
    grpc_max_connection_age_s: float = 1800.0  # then GOAWAY: the client reconnects ...
    grpc_max_connection_age_grace_s: float = 60.0  # ... and its calls still running get this long
    grpc_default_deadline_s: float = 120.0  # for calls that come without a deadline
    # YAML file with batching overrides: global keys plus ``models: {name: {...}}``.
    config: Path | None = None
    # Batching overrides for every model (None: the manifest's default).
    max_batch_rows: int | None = None
    max_batch_wait_ms: float | None = None
    max_queue: int | None = None
    # A batch a model answers faster than this runs on the event loop, not handed to its thread
    # (serving/worker.py); 0: always on the thread.
    inline_max_ms: float = 1.0
    memory_budget_bytes: int | None = None
    lazy_load: bool = False
    log_level: str = "info"
    log_json: bool = True
    inference_threads: int | None = None
    # The web console at /console (``serve --console``): loopback clients only unless a token is set.
    console: bool = False
    # Trust (modelpod.trust.policy): trusted key files (``,``/``:`` separated), whether pods must be
    # signed to load (None: when keys are set), and the key that decrypts encrypted weights.
    trust_keys: str | None = None
    require_signed: bool | None = None
    decrypt_key_file: Path | None = None
    # Replicas for every model (serving/scaling.py; a config file's ``models:`` entry wins).
    isolation: str | None = None  # thread | process
    replicas: str | None = None  # N or MIN:MAX
    target_inflight: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    max_memory: str | None = None  # bytes or a size: 512MiB, 2GB
    # Own environments (serving/envs.py): the wheel cache they are built from offline
    # (``--wheel-cache``), and ``auto|own|server`` for every model (``--env``; the config file's
    # ``env`` per model wins).
    wheel_cache: Path | None = None
    pod_env: str | None = None

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``MODELPOD_<FIELD>`` variables, then apply non-None overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MODELPOD_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def read_token_file(path: Path) -> str:
    """The bearer token in ``path``: its content without surrounding whitespace; never empty."""
    from modelpod.errors import UsageError

    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"token file {path}: cannot read it: {reason}") from None
    if not token:
        raise UsageError(f"token file {path}: the file is empty")
    return token


def _parse(name: str, type_text: str, raw: str) -> Any:
    if "Path" in type_text:
        return Path(raw).expanduser()
    if "bool" in type_text:
        word = raw.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        from modelpod.errors import UsageError

        raise UsageError(f"MODELPOD_{name.upper()} must be true or false (also 1/0, yes/no, on/off), got {raw!r}")
    if "int" in type_text and "float" not in type_text:
        try:
            return int(raw)
        except ValueError:
            from modelpod.errors import UsageError

            raise UsageError(f"MODELPOD_{name.upper()} must be an integer, got {raw!r}") from None
    if "float" in type_text:
        try:
            return float(raw)
        except ValueError:
            from modelpod.errors import UsageError

            raise UsageError(f"MODELPOD_{name.upper()} must be a number, got {raw!r}") from None
    return raw
