"""Helpers for the serving, protocol and ``serve`` end-to-end tests.

- tiny custom models, one behaviour each (echo rows, wait on a gate, sleep, fail, grow memory);
- ``LiveServer``: an engine with REST (and gRPC) on ephemeral loopback ports, in a thread with its
  own event loop, so tests use ordinary blocking clients;
- ``ServeProcess``: a real ``modelpod serve`` (or ``custom_server.py``) subprocess, stopped by PID;
- ``wait_for``: poll with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from modelpod.model import Batch, Model
from modelpod.pod import Signature, TensorSpec
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


def wait_for(check: Callable[[], Any], deadline_s: float, what: str) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    delay = 0.005
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what} after {deadline_s:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# -- models --------------------------------------------------------------------------------------
ECHO_SIGNATURE = Signature(
    (TensorSpec("x", "FP32", (-1, 2)),),
    (TensorSpec("y", "FP32", (-1, 2)), TensorSpec("batch_rows", "INT64", (-1,))),
)


class EchoModel(Model):
    """Returns its input rows as ``y`` and, per row, how many rows the batch it ran in had."""

    signature = ECHO_SIGNATURE

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        x = inputs["x"]
        self.batches.append(len(x))
        return {"y": np.array(x, copy=True), "batch_rows": np.full(len(x), len(x), dtype=np.int64)}


class GatedModel(EchoModel):
    """Blocks in ``predict`` until ``gate`` is set; ``entered`` counts predicts started."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = 0

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        self.entered += 1
        if not self.gate.wait(60):
            raise RuntimeError("gate never opened")
        return super().predict(inputs)


class SlowModel(EchoModel):
    """Takes ``delay`` seconds per batch (the time a real model would spend computing)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        time.sleep(self.delay)
        return super().predict(inputs)


class PoisonModel(EchoModel):
    """Raises when any input value is negative, so one bad request can sit in a batch."""

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return super().predict(inputs)


class BrokenModel(EchoModel):
    """Fails to load."""

    def load(self) -> None:
        raise RuntimeError("weights are corrupt")


class BigModel(EchoModel):
    """Holds ``nbytes`` of memory while loaded (touched, so it counts in RSS)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes
        self.weights: np.ndarray[Any, Any] | None = None

    def load(self) -> None:
        self.weights = np.ones(self.nbytes // 8, dtype=np.float64)
        super().load()

    def unload(self) -> None:
        self.weights = None
        super().unload()


class TextModel(Model):
    """BYTES in, BYTES out: upper-cases each element."""

    signature = Signature((TensorSpec("text", "BYTES", (-1,)),), (TensorSpec("upper", "BYTES", (-1,)),))

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        out = np.empty(len(inputs["text"]), dtype=object)
        out[:] = [bytes(v).upper() for v in inputs["text"]]
        return {"upper": out}


MODELS: dict[str, Callable[..., Model]] = {
    "echo": EchoModel, "gated": GatedModel, "slow": SlowModel, "poison": PoisonModel, "broken": BrokenModel,
    "big": BigModel, "text": TextModel,
}


def echo_request(rows: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.reshape(-1).tolist()}], **extra}


# -- an in-process server ------------------------------------------------------------------------
class LiveServer:
    """REST (and optionally gRPC) over an engine, in a background thread with its own event loop."""

    def __init__(self, settings: Settings, setup: Callable[[InferenceEngine], None], *, grpc: bool = False,
                 start_engine: bool = True, wrap: Callable[[Any, InferenceEngine], Any] | None = None) -> None:
        """``wrap(rest_app, engine)``: the handler to serve instead (the console); its ``start()`` and
        ``close()`` are called when it has them."""
        self.settings = settings
        self.wrap = wrap
        self.handler: Any = None
        self.engine = InferenceEngine(settings)
        setup(self.engine)
        self.grpc = grpc
        self.start_engine = start_engine
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self.grpc_port = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.http: Any = None

    def __enter__(self) -> LiveServer:
        self._thread = threading.Thread(target=self._main, name="live-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the in-process server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def _main(self) -> None:
        import uvloop

        try:
            uvloop.run(self._serve())
        except BaseException as exc:  # surfaced to the test by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from modelpod.protocols.auth import Auth
        from modelpod.protocols.http import HttpLimits, HttpServer
        from modelpod.protocols.rest import RestApp
        from modelpod.protocols.tls import TlsFiles

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tls = TlsFiles.from_settings(self.settings)
        auth = Auth.from_settings(self.settings)  # one for both protocols, as `modelpod serve` has
        handler: Any = RestApp(self.engine, self.settings, auth)
        if self.wrap is not None:
            handler = self.wrap(handler, self.engine)
            if hasattr(handler, "start"):
                handler.start()
        self.handler = handler
        self.http = HttpServer(handler, max_body_bytes=self.settings.max_body_bytes,
                               keepalive_timeout_s=self.settings.keepalive_timeout_s,
                               limits=HttpLimits.from_settings(self.settings),
                               tls=tls.ssl_context() if tls is not None else None)
        port = await self.http.start("127.0.0.1", 0)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        grpc_server = None
        if self.grpc:
            from modelpod.protocols.grpc import start_grpc

            grpc_server, self.grpc_port = await start_grpc(self.engine, self.settings, "127.0.0.1", 0, auth=auth,
                                                           tls=tls)
        if self.start_engine:
            await self.engine.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if hasattr(handler, "close"):
                await handler.close()
            await self.http.close()
            if grpc_server is not None:
                await grpc_server.stop(0)
            await self.engine.close()

    def call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60) -> T:
        """Run a coroutine in the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def metric(self, text: str, name: str, **labels: str) -> float:
        return metric_value(text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text scrape (0 if absent)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name and all(w in head for w in want):
                return float(value)
    return 0.0


# -- a real server process -----------------------------------------------------------------------
class ServeProcess:
    """A server subprocess that prints one JSON line (``--json``) once it serves; stopped by PID."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None, startup_s: float = 120) -> None:
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, text=True,
                                     cwd=REPO)
        self.stderr: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()
        self._pumps = [threading.Thread(target=self._pump_out, args=(lines,), daemon=True),
                       threading.Thread(target=self._pump_err, daemon=True)]
        for t in self._pumps:
            t.start()
        try:
            line = lines.get(timeout=startup_s)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"server did not start in {startup_s}s: {''.join(self.stderr)[-3000:]}") from None
        if line is None:
            self.stop()
            raise RuntimeError(f"server exited {self.proc.returncode}: {''.join(self.stderr)[-3000:]}")
        self.info: dict[str, Any] = json.loads(line)
        self.url: str = self.info["rest"]
        self.grpc: str | None = self.info.get("grpc")

    def _pump_out(self, lines: queue.Queue[str | None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                lines.put(line)
        lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, then SIGKILL: only this process, by its PID."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for t in self._pumps:
            t.join(timeout)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def modelpod_serve(home: Path, *args: str, env: Mapping[str, str] | None = None) -> ServeProcess:
    """``modelpod serve ARGS --port 0 --json`` with MODELPOD_HOME=home."""
    argv = [str(PYTHON), "-m", "modelpod", "--home", str(home), "serve", *args, "--host", "127.0.0.1",
            "--port", "0", "--json"]
    return ServeProcess(argv, env={"MODELPOD_LOG_LEVEL": "warning", **(env or {})})


def custom_serve(spec: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ServeProcess:
    """``custom_server.py``: the real server process, serving this file's models (see that script)."""
    argv = [str(PYTHON), str(HERE / "custom_server.py"), json.dumps(spec)]
    return ServeProcess(argv, env={"MODELPOD_LOG_LEVEL": "warning", **(env or {})})


if __name__ == "__main__":  # pragma: no cover
    sys.exit("a helper module; see custom_server.py")
