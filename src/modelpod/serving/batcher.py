"""Batcher: joins requests for one model into batches bounded by rows (not requests) and wait time.

Requests queue while the model is busy and leave together when it frees up, up to
``max_batch_rows`` rows; requests whose trailing dimensions or dtypes differ are not merged, and a
request larger than ``max_batch_rows`` runs alone. Each caller gets exactly its own rows back.

Waiting: with a free model, a batch waits for more rows only up to the number of rows seen in
flight together recently (learned up on arrival, down when a wait runs out) and never longer than
``max_batch_wait_ms`` after its oldest request arrived. So a lone client is never delayed, and
concurrent clients fill batches. Everything is driven by callbacks on the event loop: no
per-request threads, tasks or timers (one timer sweeps the request deadlines, which come in
arrival order because every request of a model has the same timeout).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from modelpod.errors import InferenceTimeoutError, ModelNotReadyError, OverloadedError
from modelpod.model import Batch
from modelpod.serving.config import BatchPolicy
from modelpod.serving.metrics import ModelMetrics
from modelpod.serving.worker import BatchWorker, Done, merge_key, rows_of, settle

log = logging.getLogger("modelpod.serving")

_QUEUED, _RUNNING, _DONE = 0, 1, 2
_UNSET: Any = object()  # merge key not computed yet: only needed once a neighbour queues


class _Pending:
    __slots__ = ("arrived", "deadline", "done", "inputs", "key", "rows", "state", "trace")

    def __init__(self, inputs: Batch, rows: int, key: Any, done: Done, arrived: float,
                 deadline: float) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.done = done
        self.arrived = arrived
        self.deadline = deadline
        self.state = _QUEUED
        self.trace: Any = None  # (request span, arrival ns) while tracing


class Batcher:
    def __init__(self, worker: BatchWorker, policy: BatchPolicy, metrics: ModelMetrics | None = None,
                 *, batchable: bool = True, slots: Callable[[], int] | None = None) -> None:
        self.worker = worker
        # Batches run at once: the policy's concurrency, or what the worker says it can take now
        # (a replica set: one per serving replica).
        self._slots = slots
        self.policy = policy
        self.metrics = metrics
        self.batchable = batchable and policy.max_batch_rows > 1
        self.inflight = 0  # accepted and not yet answered
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._inflight_rows = 0
        self._running = 0
        self._target = 1  # rows expected in flight together; learned
        self._gather: asyncio.TimerHandle | None = None
        self._deadlines: deque[_Pending] = deque()  # unanswered requests, oldest first
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[asyncio.Future[None]] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by observe/ when the model loads: each batch's inputs go to drift; spans when tracing.
        self.on_batch: Callable[[Batch], None] | None = None
        self.tracing: Any = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def wake(self) -> None:
        """The worker can take more batches now (a replica came up or freed): start what is queued."""
        if self._loop is not None and not self._closed and self._queue:
            self._dispatch()

    async def submit(self, inputs: Batch, trace: Any = None) -> Batch:
        """Queue one request; its outputs once its batch has run. Raises at once when full.
        ``trace``: (the request's span, its arrival in ns) to hang queue and batch spans on."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Batch] = loop.create_future()
        item = self._queued(inputs, partial(settle, fut), trace)
        try:
            return await fut
        finally:
            if item.state != _DONE:  # the caller was cancelled
                if item.state == _QUEUED:
                    self._unqueue(item)
                self._finish(item)

    def enqueue(self, inputs: Batch, done: Done, trace: Any = None) -> None:
        """``submit`` without a coroutine: ``done(outputs, None)`` or ``done(None, error)`` is called
        once, on the loop, when the batch has run (or the request timed out, or the model went).
        Raises at once when full, and then never calls ``done``."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._queued(inputs, done, trace)

    def _queued(self, inputs: Batch, done: Done, trace: Any) -> _Pending:
        if self._closed:
            raise ModelNotReadyError(f"model {self.worker.label} is not loaded")
        if len(self._queue) >= self.policy.max_queue:
            raise OverloadedError(
                f"model {self.worker.label} is overloaded: {len(self._queue)} requests queued", retry_after_s=1)
        loop = self._loop
        assert loop is not None
        rows = rows_of(inputs)
        key = _UNSET if rows is not None and self.batchable else None
        now = loop.time()
        item = _Pending(inputs, rows if rows is not None else 1, key, done, now, now + self.policy.timeout_s)
        if trace is not None:
            item.trace = trace
        self._deadlines.append(item)
        if self._sweeper is None:
            self._sweeper = loop.call_at(item.deadline, self._sweep)
        self._queue.append(item)
        self._queued_rows += item.rows
        self.inflight += 1
        self._inflight_rows += item.rows
        if self._inflight_rows > self._target:
            self._target = min(self._inflight_rows, self.policy.max_batch_rows)
        if self._gather is not None:
            if self._queued_rows >= self._target:
                self._gather.cancel()
                self._gather = None
                self._dispatch(force=True)
        else:
            self._dispatch()
        return item

    def _finish(self, item: _Pending, result: Batch | None = None, error: BaseException | None = None) -> None:
        """Answer one request (once) and take it off the in-flight counts."""
        if item.state == _DONE:
            return
        item.state = _DONE
        deadlines = self._deadlines
        while deadlines and deadlines[0].state == _DONE:
            deadlines.popleft()
        self.inflight -= 1
        self._inflight_rows -= item.rows
        try:
            if error is not None:
                item.done(None, error)
            else:
                item.done(result if result is not None else {}, None)
        except Exception:  # the caller's bug: the other requests of the batch are still answered
            log.exception("a request's answer callback failed", extra={"fields": {"model": self.worker.label}})
        if self.inflight == 0 and self._idle:
            for fut in self._idle:
                if not fut.done():
                    fut.set_result(None)
            self._idle.clear()

    # -- forming batches --------------------------------------------------------------------------
    def _dispatch(self, force: bool = False) -> None:
        """Start batches while the model has a free slot; maybe wait a little for company first."""
        loop = self._loop
        assert loop is not None
        if self._gather is not None and not force:
            return  # a wait is already running; it dispatches when it ends
        limit = self.policy.max_concurrency if self._slots is None else self._slots()
        while self._queue and self._running < limit and not self._closed:
            if not force and self.batchable and self._queued_rows < self._target:
                wait = self._queue[0].arrived + self.policy.max_batch_wait_s - loop.time()
                if wait > 0:
                    self._gather = loop.call_later(wait, self._gather_expired)
                    return
            force = False
            self._start(self._take())

    def _gather_expired(self) -> None:
        self._gather = None
        # Fewer rows came than expected: expect fewer next time.
        self._target = max(1, self._queued_rows)
        self._dispatch(force=True)

    def _take(self) -> list[_Pending]:
        first = self._queue.popleft()
        items = [first]
        rows = first.rows
        if first.key is not None and self.batchable and self._queue:
            limit = self.policy.max_batch_rows
            key = _key_of(first)
            while self._queue:
                nxt = self._queue[0]
                if nxt.key is None or rows + nxt.rows > limit or _key_of(nxt) != key:
                    break
                items.append(self._queue.popleft())
                rows += nxt.rows
        self._queued_rows -= rows
        for item in items:
            item.state = _RUNNING
        return items

    def _unqueue(self, item: _Pending) -> None:
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._queued_rows -= item.rows

    def _sweep(self) -> None:
        """Answer 504 to every request past its deadline; re-arm for the oldest one left."""
        self._sweeper = None
        loop = self._loop
        assert loop is not None
        # Timers may fire a little early (uvloop rounds to milliseconds).
        now = loop.time() + 0.001
        deadlines = self._deadlines
        while deadlines:
            item = deadlines[0]
            if item.state != _DONE:
                if item.deadline > now:
                    self._sweeper = loop.call_at(item.deadline, self._sweep)
                    return
                if item.state == _QUEUED:
                    self._unqueue(item)
                self._finish(item, error=InferenceTimeoutError(
                    f"model {self.worker.label}: no answer within {self.policy.timeout_s:g}s"))
            if deadlines and deadlines[0] is item:
                deadlines.popleft()

    # -- running batches --------------------------------------------------------------------------
    def _start(self, items: list[_Pending]) -> None:
        """Hand one batch to the worker; ``_ran`` gets the outputs back on the loop."""
        loop = self._loop
        assert loop is not None
        self._running += 1
        total = items[0].rows if len(items) == 1 else sum(i.rows for i in items)
        # Nothing raised from here on may leave the batch's requests unanswered: all of it is
        # inside the try (its callers have queued them already).
        try:
            batch = items[0].inputs if len(items) == 1 else {
                n: np.concatenate([i.inputs[n] for i in items]) for n in items[0].inputs}
            if self.metrics is not None:
                self.metrics.observe_batch(total, len(items))
            if self.on_batch is not None:
                self.on_batch(batch)
            done = partial(self._ran, items, total)
            if self.tracing is not None:
                traced = [i.trace for i in items if i.trace is not None]
                spans = self.tracing.batch(traced, total, self.worker.label) if traced else None
                if spans is not None:
                    done = partial(self._ran_traced, spans, items, total)
            self.worker.submit(batch, done, loop)
        except Exception as exc:
            self._ran(items, total, None, exc)

    def _ran(self, items: list[_Pending], total: int, out: Batch | None, err: BaseException | None) -> None:
        """A batch came back (on the loop): answer each caller with its own rows."""
        if len(items) == 1:
            self._finish(items[0], out, err)
            self._release()
            return
        if err is None:
            assert out is not None
            parts = self._split(out, items)
            if parts is not None:  # outputs that are not one row per input row (a detector's boxes)
                for item, part in zip(items, parts, strict=True):
                    self._finish(item, part)
                self._release()
                return
            if all(v.ndim > 0 and v.shape[0] == total for v in out.values()):
                start = 0
                for item in items:
                    end = start + item.rows
                    self._finish(item, {k: v[start:end] for k, v in out.items()})
                    start = end
                self._release()
                return
            self.batchable = False
            log.warning("model outputs do not keep one row per input row; batching turned off",
                        extra={"fields": {"model": self.worker.label}})
        else:
            # One bad request must not fail its neighbours: run them one by one.
            log.debug("batch failed; retrying its requests one by one",
                      extra={"fields": {"model": self.worker.label, "error": str(err)}})
        loop = self._loop
        assert loop is not None
        task = loop.create_task(self._one_by_one(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ran_traced(self, spans: Any, items: list[_Pending], total: int, out: Batch | None,
                    err: BaseException | None) -> None:
        spans.ran(err)
        try:
            self._ran(items, total, out, err)
        finally:
            spans.done()

    def _split(self, out: Batch, items: list[_Pending]) -> list[Batch] | None:
        """The model's own cut of a merged batch's outputs per request, when it has one."""
        split = getattr(getattr(self.worker, "model", None), "split_outputs", None)
        if split is None:
            return None
        try:
            parts: list[Batch] | None = split(out, [i.inputs for i in items])
        except Exception:  # a bug in the cut must not lose the requests: they run one by one
            log.exception("split_outputs failed", extra={"fields": {"model": self.worker.label}})
            return None
        return parts if parts is None or len(parts) == len(items) else None

    def _release(self) -> None:
        """A batch slot freed up: start the next batch."""
        self._running -= 1
        if not self._closed:
            self._dispatch()

    async def _one_by_one(self, items: list[_Pending]) -> None:
        try:
            for item in items:
                if item.state == _DONE:  # timed out meanwhile
                    continue
                if self.metrics is not None:
                    self.metrics.observe_batch(item.rows, 1)
                try:
                    out = await self.worker.predict(item.inputs)
                except Exception as exc:
                    self._finish(item, error=exc)
                else:
                    self._finish(item, out)
        finally:
            self._release()

    # -- lifecycle --------------------------------------------------------------------------------
    async def wait_idle(self) -> None:
        """Return once no request is queued or running."""
        if self.inflight == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(fut)
        await fut

    def close(self, reason: str = "unloaded") -> None:
        """Refuse new requests and fail the queued ones; running batches finish."""
        self._closed = True
        if self._sweeper is not None and not self._deadlines:
            self._sweeper.cancel()
            self._sweeper = None
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
        while self._queue:
            item = self._queue.popleft()
            self._finish(item, error=ModelNotReadyError(f"model {self.worker.label} {reason}"))
        self._queued_rows = 0


def _key_of(item: _Pending) -> Any:
    if item.key is _UNSET:
        item.key = merge_key(item.inputs)
    return item.key
