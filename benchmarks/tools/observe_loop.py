"""Workload A's REST path in-process with observability off or on: a fixed number of requests.

What `modelpod serve` runs for one request between the HTTP parser and the socket write, for the
real sklearn pod (packed here, with a 2,000-row drift reference) and with observe/ as issue 16
sets it up: ``off`` (``drift: off``), ``on`` (tracing to an OTLP/HTTP receiver in this process at
the default sampling, ``payload_log`` to a file at its default sample, drift), or one of
``tracing``, ``payload``, ``drift`` alone. Every batch runs on the event loop (``inline_max_ms``
high), as it does at full speed: under callgrind predict takes longer than the 1 ms limit and
would move to the worker thread part of the time, at random.

Under ``valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes`` it turns the
instrumentation on (``callgrind_control -i on``) after the warm-up and dumps (``-d``) once the
rounds are answered and the drift and payload threads have written what they were handed: that
dump over ROUNDS x 64 is the instructions per request, per thread. ``--rates X`` scales observe's
per-second rates (new traces, drift batches) as tools/serve_dilated.py does, so under callgrind
the share of requests traced or binned is what it is at full speed (X = callgrind's req/s over
the real req/s, ~0.01).

Usage: python observe_loop.py MODEL_DIR MODE ROUNDS [--rates X]    (MODEL_DIR: make_models.py's A/)
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CONCURRENCY = 64
MODES = ("off", "on", "tracing", "payload", "drift")
WARM_ROUNDS = 5


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that answers 200 to every export."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _callgrind(*args: str) -> None:
    """Tell the callgrind this process runs under (if any) to do ``args``."""
    if shutil.which("callgrind_control"):
        subprocess.run(["callgrind_control", *args, str(os.getpid())], capture_output=True, timeout=60, check=False)


async def run(model_dir: Path, mode: str, rounds: int, work: Path) -> float:
    import numpy as np

    from modelpod.api import pack
    from modelpod.observe.hub import tracing_from_env
    from modelpod.protocols.rest import RestApp
    from modelpod.protocols.wire import Request
    from modelpod.serving.config import ServeConfig
    from modelpod.serving.engine import InferenceEngine
    from modelpod.settings import Settings
    from modelpod.store import Store

    home = work / "home"
    sample = np.load(model_dir / "sample.npy")
    reference = work / "reference.npy"
    np.save(reference, np.random.default_rng(0).normal(size=(2000, sample.shape[1])).astype(np.float32))
    pack(model_dir / "model.skops", "logreg", store=Store(home), sample=sample, reference=reference)
    payloads = str(work / "payloads.jsonl")
    config = {"off": {"drift": "off"}, "on": {"payload_log": {"sink": payloads}}, "tracing": {"drift": "off"},
              "payload": {"drift": "off", "payload_log": {"sink": payloads}}, "drift": {}}[mode]
    (work / "serve.yaml").write_text(json.dumps(config))
    settings = Settings(home=home).with_(config=work / "serve.yaml", max_batch_rows=32, max_batch_wait_ms=5,
                                         inline_max_ms=1e9)
    engine = InferenceEngine(settings, ServeConfig.load(settings))
    receiver = None
    if mode in ("on", "tracing"):
        receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        engine.observe.tracing = tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}",
                                                   "OTEL_SERVICE_NAME": "bench"})
    engine.add("logreg")
    await engine.start()
    app = RestApp(engine, settings)
    body = (model_dir / "body.json").read_bytes()
    headers = {"host": "127.0.0.1:8080", "content-type": "application/json", "content-length": str(len(body))}

    async def one() -> None:
        request = Request("POST", "/v2/models/logreg/infer", "", dict(headers), body, True, time.perf_counter())
        response = await app(request)
        assert response.status == 200, response.body

    try:
        for _ in range(WARM_ROUNDS):
            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
        _callgrind("-i", "on")
        started = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
        seconds = time.perf_counter() - started
        await asyncio.to_thread(engine.observe.drift.drain, 5.0)
        if engine.observe.payload is not None:
            engine.observe.configure_payload({})  # writes what the sink was handed, then stops it
        _callgrind("-d")
    finally:
        await engine.close()
        if receiver is not None:
            receiver.shutdown()
    return rounds * CONCURRENCY / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("mode", choices=MODES)
    p.add_argument("rounds", type=int)
    p.add_argument("--rates", type=float, default=1.0, help="scale observe's per-second rates (default 1)")
    args = p.parse_args(argv)
    from modelpod.observe import drift, tracing

    tracing.DEFAULT_ROOT_RATE *= args.rates
    drift.BATCHES_PER_S *= args.rates
    try:
        import uvloop  # what `modelpod serve` runs on
    except ImportError:
        uvloop = None
    with tempfile.TemporaryDirectory() as tmp:
        coro = run(args.model_dir.resolve(), args.mode, args.rounds, Path(tmp))
        rps = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    print(f"{args.mode}: {rps:,.0f} req/s over {args.rounds * CONCURRENCY} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
