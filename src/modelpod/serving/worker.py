"""ModelWorker: runs ``Model.predict`` on its own threads, so the event loop never waits on a model.

One worker per loaded model version, with ``max_concurrency`` long-lived threads fed from one
queue. A batch crosses to a thread once and its result crosses back once: the thread hands the
result to a callback scheduled on the caller's loop with ``call_soon_threadsafe``. That skips the
executor's two futures and their chained callbacks per batch (run_in_executor), which at one row
per request cost about as much as a small model's predict.

A framework model (``computes_only``) that answers a batch in less than ``inline_s`` (a linear
model, a small tree) costs less than the hand-over itself (a queue, a wake-up, the GIL passed back
and forth, the loop woken): its batches of a size measured that fast run on the caller's thread,
the event loop, which is blocked for less than ``inline_s`` each time. Every batch is timed, so a
size that turns slow goes back to the thread, and a size never seen is first run there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import numpy as np

from modelpod.errors import InferenceError, ModelInputError, ModelpodError
from modelpod.model import Batch, Model

log = logging.getLogger("modelpod.serving")

# Called on the loop thread with (outputs, None) or (None, error).
Done = Callable[[Batch | None, BaseException | None], None]
_Job = tuple[Batch, Done, asyncio.AbstractEventLoop]


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class BatchWorker(Protocol):
    """What the batcher runs batches on: a ``ModelWorker`` (threads) or a ``ReplicaSet`` (processes)."""

    label: str

    def submit(self, batch: Batch, done: Done, loop: asyncio.AbstractEventLoop) -> None: ...

    async def predict(self, batch: Batch) -> Batch: ...

    def close(self) -> None: ...


def settle(fut: asyncio.Future[Batch], out: Batch | None, err: BaseException | None) -> None:
    """A ``Done`` callback's answer put into ``fut`` (unless its awaiting caller was cancelled)."""
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(out if out is not None else {})


async def awaited(submit: Callable[[Batch, Done, asyncio.AbstractEventLoop], None], batch: Batch) -> Batch:
    """A worker's ``submit`` as a coroutine: the outputs, or the error raised."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Batch] = loop.create_future()
    submit(batch, partial(settle, fut), loop)
    return await fut


class ModelWorker:
    def __init__(self, model: Model, label: str, threads: int = 1, inline_s: float = 0.0) -> None:
        self.model = model
        self.label = label
        self._size = max(1, threads)
        # Only a model that computes and nothing else (with more threads, batches would overlap).
        self._inline_s = inline_s if self._size == 1 and model.computes_only else 0.0
        self._fast_rows = 0  # the largest batch (rows) measured under inline_s: up to it, run inline
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, batch: Batch, done: Done, loop: asyncio.AbstractEventLoop) -> None:
        """Run ``batch`` on a worker thread; ``done`` is then called on ``loop`` (exactly once)."""
        if self._closed:
            raise InferenceError(f"model {self.label}: the worker is closed")
        if self._fast_rows:
            rows = rows_of(batch)
            if rows is not None and rows <= self._fast_rows:
                self._inline(batch, rows, done, loop)
                return
        if len(self._threads) < self._size:
            self._spawn()
        self._jobs.put((batch, done, loop))

    async def predict(self, batch: Batch) -> Batch:
        """``submit`` as a coroutine: the outputs, or the error raised."""
        return await awaited(self.submit, batch)

    def _inline(self, batch: Batch, rows: int, done: Done, loop: asyncio.AbstractEventLoop) -> None:
        out: Batch | None = None
        err: BaseException | None = None
        started = time.perf_counter()
        try:
            out = self.call(batch)
        except Exception as exc:  # handed to the caller, as from a thread
            err = exc
        self._timed(rows, time.perf_counter() - started)
        loop.call_soon(done, out, err)  # not now: the caller is still inside its submit

    def _timed(self, rows: int | None, seconds: float) -> None:
        """Learn from one batch's predict time which batch sizes may run inline."""
        if rows is None:
            return
        if seconds < self._inline_s:
            if rows > self._fast_rows:
                self._fast_rows = rows
        elif rows <= self._fast_rows:  # slower than before (a busy machine, bigger inputs): back to the thread
            self._fast_rows = rows - 1

    def _spawn(self) -> None:
        # Threads start on first use, so a worker that never runs a batch costs nothing.
        with self._lock:
            while len(self._threads) < self._size:
                t = threading.Thread(target=self._serve, name=f"modelpod-{self.label}-{len(self._threads)}",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            batch, done, loop = job
            out: Batch | None = None
            err: BaseException | None = None
            started = time.perf_counter()
            try:
                out = self.call(batch)
            except BaseException as exc:  # handed to the caller, never lost
                err = exc
            if self._inline_s:
                self._timed(rows_of(batch), time.perf_counter() - started)
            try:
                loop.call_soon_threadsafe(done, out, err)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
                log.debug("a batch finished after its event loop closed", extra={"fields": {"model": self.label}})
            del job, batch, out, err  # drop references before blocking again

    def call(self, batch: Batch) -> Batch:
        """One predict, in the calling thread; the model's own errors become InferenceError."""
        try:
            out = self.model.predict(batch)
        except ModelpodError:
            raise
        except Exception as exc:  # the model's own failure: report it, keep serving
            raise model_error(self.label, exc, batch) from exc
        if not isinstance(out, dict):
            raise InferenceError(f"model {self.label} returned {type(out).__name__}, not a dict of arrays")
        for k, v in out.items():
            if type(v) is not np.ndarray or type(k) is not str:
                return {str(k): v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in out.items()}
        return out

    def close(self) -> None:
        """Let the threads finish the batches already handed over, then end; never blocks the caller."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the threads to end after ``close``; True when they all have."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def __repr__(self) -> str:
        return f"ModelWorker({self.label})"


# What a model raises on input it cannot take (the client's mistake, 400) rather than on a bug
# (500): ValueError (ragged columns in pandas, NaN in scikit-learn, bad UTF-8), IndexError (an
# embedding index out of range in torch), and the frameworks' own invalid-argument errors.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, IndexError)
CLIENT_ERROR_NAMES = frozenset({"InvalidArgument", "InvalidArgumentError"})  # onnxruntime, tensorflow
_CLIENT_NAMES = frozenset({c.__name__ for c in CLIENT_ERRORS} | CLIENT_ERROR_NAMES)
_INNER = re.compile(r"\n\s*(\w+): ([^\n]*)\s*\Z")
_OUT_OF_RANGE = re.compile(r"\bindex\b.*\bout of (range|bounds)\b", re.IGNORECASE)
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,()]+){2,}")


def model_error(label: str, exc: BaseException, batch: Batch | None = None) -> ModelpodError:
    """The one mapping of a model's exception: ModelInputError (400) when the input caused it, else
    InferenceError (500) whose message holds no detail (the detail is for the server log)."""
    # TorchScript: the op's error is the last line of a traceback, and IndexError became RuntimeError.
    inner = _INNER.search(str(exc))
    if inner is not None and (inner.group(1) in _CLIENT_NAMES or _OUT_OF_RANGE.search(inner.group(2))):
        return ModelInputError(f"model {label} refused the input: {inner.group(1)}: {_scrub(inner.group(2))}")
    if (isinstance(exc, CLIENT_ERRORS) or type(exc).__name__ in CLIENT_ERROR_NAMES
            or (batch is not None and _nonfinite(batch))):
        return ModelInputError(f"model {label} refused the input: {short_reason(exc)}")
    return InferenceError(f"model {label} failed", detail=f"{type(exc).__name__}: {exc}")


def short_reason(exc: BaseException) -> str:
    """One line of an exception's message, without server paths, short enough for a client."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = _scrub(lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scrub(text: str) -> str:
    text = _PATH.sub(lambda m: m.group(0).replace("\\", "/").rsplit("/", 1)[-1], text.strip())
    return text if len(text) <= 300 else text[:297] + "..."


def _nonfinite(batch: Batch) -> bool:
    """Whether a float input holds NaN or Infinity (then the model's failure is blamed on them)."""
    return any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in batch.values())


def rows_of(batch: Batch) -> int | None:
    """The shared first dimension of every input, or None when they disagree (cannot be merged)."""
    rows: int | None = None
    for arr in batch.values():
        if arr.ndim == 0:
            return None
        n = int(arr.shape[0])
        if rows is None:
            rows = n
        elif rows != n:
            return None
    return rows


def merge_key(batch: Batch) -> tuple[Any, ...]:
    """Requests with equal keys can be concatenated along rows: same names, dtypes, trailing dims."""
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in batch.items())
