"""The serving process: REST and gRPC on one uvloop event loop, signals, and a graceful drain.

Start: bind REST (and gRPC), so liveness answers while models load; load; print where we listen.
SIGTERM, SIGHUP or SIGINT: readiness turns false and new requests get 503 (gRPC UNAVAILABLE) while
the requests already in flight finish, for at most ``drain_timeout_s``; then everything closes and
the process exits 0. A second SIGTERM/SIGHUP is logged and ignored (orchestrators and wrappers may
send one twice); a third, or a second Ctrl-C (SIGINT), ends the drain at once.

gRPC: ``--grpc-port N`` needs grpcio (one-line install hint otherwise). Without the flag, gRPC
listens on 8081 when grpcio is installed and that port is free, and is skipped otherwise.

TLS (``--tls-cert``/``--tls-key``, ``--tls-client-ca`` for mutual TLS) covers both protocols; the
tokens (``--token``, or ``--token-file`` with one token or a table of scoped ones) are one Auth
shared by both, so a token's rate limit counts its REST and gRPC calls together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO, cast

from modelpod import __version__
from modelpod.errors import MissingExtraError, ModelpodError, UsageError
from modelpod.observe.hub import tracing_from_env
from modelpod.protocols.auth import Auth, token_table
from modelpod.protocols.http import HttpLimits, HttpServer
from modelpod.protocols.rest import RestApp, is_loopback
from modelpod.protocols.tls import TlsFiles
from modelpod.serving import logs, scaling
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.replica_load import start_early
from modelpod.settings import Settings, read_token_file

log = logging.getLogger("modelpod.serving")
DEFAULT_GRPC_PORT = 8081


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """``modelpod serve``: build the engine from the command line and run until signalled."""
    settings = settings.with_(
        host=args.host, port=args.port, grpc_port=args.grpc_port,
        max_batch_rows=args.max_batch_rows, max_batch_wait_ms=args.max_batch_wait_ms,
        inline_max_ms=getattr(args, "inline_max_ms", None),
        config=Path(args.config) if args.config else None, console=getattr(args, "console", None),
        decrypt_key_file=Path(args.decrypt_key).expanduser() if getattr(args, "decrypt_key", None) else None,
        **scaling.settings_changes(args),
        wheel_cache=Path(args.wheel_cache).expanduser() if getattr(args, "wheel_cache", None) else None,
        pod_env=getattr(args, "pod_env", None),
    )
    if settings.inline_max_ms < 0:
        raise UsageError(f"--inline-max-ms must be >= 0, not {settings.inline_max_ms:g}")
    settings = _with_token(settings, args.token, getattr(args, "token_file", None))
    settings = settings.with_(tls_cert=_path(getattr(args, "tls_cert", None)),
                              tls_key=_path(getattr(args, "tls_key", None)),
                              tls_client_ca=_path(getattr(args, "tls_client_ca", None)))
    TlsFiles.from_settings(settings)  # a bad certificate, key or token file stops here (exit 2), before loading
    Auth.from_settings(settings)
    logs.configure(settings.log_level, settings.log_json)
    if args.token:
        log.warning("--token is visible in the process list; prefer --token-file or MODELPOD_TOKEN_FILE")
    grpc_mode = "off" if getattr(args, "no_grpc", False) else ("required" if settings.grpc_port is not None else "auto")
    if grpc_mode == "required" and not _have_grpc():
        raise MissingExtraError("grpc", "grpcio", "the gRPC endpoint (--grpc-port)")
    engine = InferenceEngine(settings, ServeConfig.load(settings))
    engine.observe.tracing = tracing_from_env(os.environ)  # the OTEL_* variables, read here at the edge
    if not args.refs and not engine.config.routes:
        raise UsageError("nothing to serve: name at least one REF, or routes in --config")
    for ref in args.refs:
        engine.add(ref)
    engine.configure_routes()  # a bad route stops the start here (exit 2), before anything listens
    start_early(engine.registry, settings)  # replica templates: forked now, they load while the server starts
    return run(engine, settings, grpc=grpc_mode, as_json=bool(getattr(args, "json", False)))


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _with_token(settings: Settings, token: str | None, token_file: str | None) -> Settings:
    """The command line's token (``--token`` or ``--token-file``) over the environment's
    (``MODELPOD_TOKEN`` or ``MODELPOD_TOKEN_FILE``); the file is read here, when serving only. A
    file holding one token sets ``token``; a table of scoped tokens stays a file (protocols/auth.py)."""
    if token and token_file:
        raise UsageError("give --token or --token-file, not both")
    if token_file:
        return _from_file(settings, Path(token_file).expanduser())
    if token:
        return replace(settings, token=token, token_file=None)
    if settings.token_file is not None:
        if settings.token is not None:
            raise UsageError("set MODELPOD_TOKEN or MODELPOD_TOKEN_FILE, not both")
        return _from_file(settings, settings.token_file)
    return settings


def _from_file(settings: Settings, path: Path) -> Settings:
    text = read_token_file(path)
    if token_table(text, str(path)) is not None:
        return replace(settings, token=None, token_file=path)
    return replace(settings, token=text, token_file=path)


def run(engine: InferenceEngine, settings: Settings, *, grpc: str = "auto", as_json: bool = False,
        out: TextIO | None = None) -> int:
    """Serve ``engine`` until SIGTERM/SIGINT; returns the exit code. ``grpc``: off, auto or required."""
    return _run_loop(_main(engine, settings, grpc, as_json, out or sys.stdout))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a core dependency off Windows
        return asyncio.run(main)
    return int(uvloop.run(main))


async def _main(engine: InferenceEngine, settings: Settings, grpc_mode: str, as_json: bool, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        fields = {"signal": signal.Signals(signum).name, "count": len(received)}
        if len(received) == 1:
            log.info("signal received: draining", extra={"fields": fields})
            stop.set()
        elif len(received) >= 3 or (signum == signal.SIGINT and received[-2] == signal.SIGINT):
            log.warning("signal received again: ending the drain now", extra={"fields": fields})
            hurry.set()
        else:
            log.warning("signal received while draining: ignored, the drain goes on (a third one ends it)",
                        extra={"fields": fields})

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started under nohup: a hang-up is meant to leave the server running
        loop.add_signal_handler(sig, on_signal, sig)

    tls = TlsFiles.from_settings(settings)
    auth = Auth.from_settings(settings)
    app = RestApp(engine, settings, auth)
    console = None
    if settings.console:
        from modelpod.console import ConsoleApp

        console = ConsoleApp(app, engine, settings)
    http = HttpServer(console or app, max_body_bytes=settings.max_body_bytes,
                      keepalive_timeout_s=settings.keepalive_timeout_s, limits=HttpLimits.from_settings(settings),
                      tls=tls.ssl_context() if tls is not None else None)
    try:
        port = await http.start(settings.host, settings.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    grpc_server, grpc_port = await _start_grpc(engine, settings, grpc_mode, auth, tls)
    if auth is not None:
        log.info("bearer tokens required", extra={"fields": {"tokens": sorted(g.name for g in auth.grants.values())}})
    if tls is not None:
        log.info("TLS on", extra={"fields": {"cert": str(tls.cert_path), "mutual": tls.mutual}})
    if auth is None and not is_loopback(settings.host):
        log.warning("listening beyond loopback without a token: inference is open to the network and the "
                    "repository API (load/unload) is refused; set --token or MODELPOD_TOKEN",
                    extra={"fields": {"host": settings.host}})
    drained = False
    if console is not None:
        if settings.token is None and not is_loopback(settings.host):
            log.warning("the console answers loopback clients only while no token is set",
                        extra={"fields": {"host": settings.host}})
        console.start()
    try:
        await engine.start()
        _announce(engine, settings, port, grpc_port, as_json, out, tls is not None)
        await stop.wait()
        drained = await _drain(engine, http, grpc_server, settings, hurry)
    finally:
        if console is not None:
            await console.close()
        await http.close()
        if grpc_server is not None:
            await grpc_server.stop(0)
        if drained or not stop.is_set():
            await engine.close(collect=False)  # the process exits next: no collection per model
        # A drain cut short leaves the requests still in the models to the process's exit: unloading
        # would wait for them (the model threads are daemons and end with the process).
    log.info("stopped")
    return 0


def _have_grpc() -> bool:
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


async def _start_grpc(engine: InferenceEngine, settings: Settings, mode: str, auth: Auth | None,
                      tls: TlsFiles | None) -> tuple[Any, int | None]:
    if mode == "off" or (mode == "auto" and not _have_grpc()):
        return None, None
    from modelpod.protocols.grpc import start_grpc

    port = settings.grpc_port if settings.grpc_port is not None else DEFAULT_GRPC_PORT
    try:
        server, bound = await start_grpc(engine, settings, settings.host, port, auth=auth, tls=tls)
    except ModelpodError as exc:
        if mode == "required":
            raise
        log.warning("gRPC not started", extra={"fields": {"error": exc.message}})
        return None, None
    return server, bound


async def _drain(engine: InferenceEngine, http: HttpServer, grpc_server: Any, settings: Settings,
                 hurry: asyncio.Event) -> bool:
    """Finish what is in flight, for at most the drain timeout; True when everything finished."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.drain_timeout_s
    engine.begin_drain()
    http.begin_drain()
    log.info("draining", extra={"fields": {"inflight": engine.inflight(), "timeout_s": settings.drain_timeout_s}})
    idle = asyncio.ensure_future(asyncio.gather(engine.wait_idle(), http.wait_idle()))
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait((idle, hurried), timeout=settings.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finished = idle.done()
    if not finished:
        log.warning("drain cut short", extra={"fields": {
            "inflight": engine.inflight(), "why": "signal" if hurry.is_set() else "drain timeout"}})
    for fut in (idle, hurried):
        fut.cancel()
    if grpc_server is not None:
        await grpc_server.stop(max(0.0, deadline - loop.time()) if finished else 0)
    return finished


def _announce(engine: InferenceEngine, settings: Settings, port: int, grpc_port: int | None, as_json: bool,
              out: TextIO, tls: bool = False) -> None:
    """Print where we listen and what we serve (one JSON line with ``--json``)."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    rest = f"{'https' if tls else 'http'}://{host}:{port}"
    models = [{"name": e.name, "version": e.version_text, "state": e.state.value, "reason": e.reason,
               "url": f"{rest}/v2/models/{e.name}", "isolation": e.replica_policy.isolation,
               "replicas": _replicas(e)} for e in engine.registry]
    grpc = f"{host}:{grpc_port}" if grpc_port is not None else None
    console = f"{rest}/console" if settings.console else None
    routes = [{"name": r.spec.name, "share": r.describe()["share"], "shadow": list(r.spec.shadow),
               "status": r.status, "url": f"{rest}/v2/models/{r.spec.name}"} for r in engine.traffic.routes.values()]
    if as_json:
        info: dict[str, Any] = {"rest": rest, "grpc": grpc, "models": models, "routes": routes}
        if console:
            info["console"] = console
        print(json.dumps(info), file=out, flush=True)
    else:
        lines = [f"modelpod {__version__} serving OIP v2", f"  REST     {rest}/v2  (metrics: {rest}/metrics)"]
        if grpc:
            lines.append(f"  gRPC     {grpc}{'  (TLS)' if tls else ''}")
        if console:
            lines.append(f"  console  {console}")
        for m in models:
            ref = f"{m['name']}:{m['version']}" if m["version"] else m["name"]
            state = m["state"] if not m["reason"] else f"{m['state']} ({m['reason']})"
            lines.append(f"  model    {ref:<24} {state:<12} {m['url']}")
            if m["isolation"] == "process":
                lines.append(f"           replicas {_replica_line(cast(dict[str, Any], m['replicas']))}")
        for r in routes:
            split = " ".join(f"{v} {100 * share:g}%" for v, share in r["share"].items())
            shadow = f" + shadow {', '.join(r['shadow'])}" if r["shadow"] else ""
            lines.append(f"  route    {r['name']:<24} {split}{shadow}  {r['url']}")
        print("\n".join(lines), file=out, flush=True)
    log.info("serving", extra={"fields": {"rest": rest, "grpc": grpc, "models": [m["name"] for m in models]}})



def _replicas(entry: Any) -> dict[str, Any]:
    """What ``serve`` prints of a model's replicas: the policy and each process."""
    p = entry.replica_policy
    live = entry.replicas.describe() if entry.replicas is not None else []
    return {"min": p.min, "max": p.max, "target_inflight": p.target_inflight, "processes": live}


def _replica_line(r: dict[str, Any]) -> str:
    span = str(r["min"])
    if r["min"] != r["max"]:
        span = f"{r['min']}..{r['max']} (target {r['target_inflight']:g} in flight)"
    pids = ", ".join(f"#{p['replica']} pid {p['pid']} {p['state']}" for p in r["processes"]) or "none running"
    return f"{span}: {pids}"
