"""Batcher: joins requests for one model into batches bounded by rows (not requests) and wait time.

Requests queue while the model is busy and leave together when it frees up, up to
``max_batch_rows`` rows; requests whose trailing dimensions or dtypes differ are not merged, and a
request larger than ``max_batch_rows`` runs alone. Each caller gets exactly its own rows back.

Waiting: with a free model, a batch waits for more rows only up to the number of rows seen in
flight together recently (learned up on arrival, down when a wait runs out) and never longer than
``max_batch_wait_ms`` after its oldest request arrived. So a lone client is never delayed, and
concurrent clients fill batches. Everything is driven by callbacks on the event loop: no
per-request threads or tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import numpy as np

from modelpod.errors import InferenceTimeoutError, ModelNotReadyError, OverloadedError
from modelpod.model import Batch
from modelpod.serving.config import BatchPolicy
from modelpod.serving.metrics import ModelMetrics
from modelpod.serving.worker import ModelWorker, merge_key, rows_of

log = logging.getLogger("modelpod.serving")

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class _Pending:
    __slots__ = ("arrived", "future", "inputs", "key", "rows", "state", "timer")

    def __init__(self, inputs: Batch, rows: int, key: Any, future: asyncio.Future[Batch], arrived: float) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future = future
        self.arrived = arrived
        self.state = _QUEUED
        self.timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(self, worker: ModelWorker, policy: BatchPolicy, metrics: ModelMetrics | None = None,
                 *, batchable: bool = True) -> None:
        self.worker = worker
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[asyncio.Future[None]] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, inputs: Batch) -> Batch:
        """Queue one request; its outputs once its batch has run. Raises at once when full."""
        if self._closed:
            raise ModelNotReadyError(f"model {self.worker.label} is not loaded")
        if len(self._queue) >= self.policy.max_queue:
            raise OverloadedError(
                f"model {self.worker.label} is overloaded: {len(self._queue)} requests queued", retry_after_s=1)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        rows = rows_of(inputs)
        key = merge_key(inputs) if rows is not None and self.batchable else None
        item = _Pending(inputs, rows if rows is not None else 1, key, loop.create_future(), loop.time())
        item.timer = loop.call_later(self.policy.timeout_s, self._expire, item)
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
        try:
            return await item.future
        finally:
            if item.state != _DONE:  # the caller was cancelled
                if item.state == _QUEUED:
                    self._unqueue(item)
                self._finish(item)

    def _finish(self, item: _Pending, result: Batch | None = None, error: BaseException | None = None) -> None:
        """Answer one request (once) and take it off the in-flight counts."""
        if item.state == _DONE:
            return
        item.state = _DONE
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        self.inflight -= 1
        self._inflight_rows -= item.rows
        if not item.future.done():
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result if result is not None else {})
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
        while self._queue and self._running < self.policy.max_concurrency and not self._closed:
            if not force and self.batchable and self._queued_rows < self._target:
                wait = self._queue[0].arrived + self.policy.max_batch_wait_s - loop.time()
                if wait > 0:
                    self._gather = loop.call_later(wait, self._gather_expired)
                    return
            force = False
            items = self._take()
            self._running += 1
            task = loop.create_task(self._run(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _gather_expired(self) -> None:
        self._gather = None
        # Fewer rows came than expected: expect fewer next time.
        self._target = max(1, self._queued_rows)
        self._dispatch(force=True)

    def _take(self) -> list[_Pending]:
        first = self._queue.popleft()
        items = [first]
        rows = first.rows
        if first.key is not None:
            limit = self.policy.max_batch_rows
            while self._queue:
                nxt = self._queue[0]
                if nxt.key != first.key or rows + nxt.rows > limit:
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

    def _expire(self, item: _Pending) -> None:
        item.timer = None
        if item.state == _QUEUED:
            self._unqueue(item)
        self._finish(item, error=InferenceTimeoutError(
            f"model {self.worker.label}: no answer within {self.policy.timeout_s:g}s"))

    # -- running batches --------------------------------------------------------------------------
    async def _run(self, items: list[_Pending]) -> None:
        try:
            if len(items) == 1:
                await self._run_one(items[0])
            else:
                await self._run_merged(items)
        finally:
            self._running -= 1
            if not self._closed:
                self._dispatch()

    async def _run_one(self, item: _Pending) -> None:
        if item.state == _DONE:  # timed out while queued behind a batch
            return
        if self.metrics is not None:
            self.metrics.observe_batch(item.rows, 1)
        try:
            out = await self.worker.predict(item.inputs)
        except Exception as exc:
            self._finish(item, error=exc)
            return
        self._finish(item, out)

    async def _run_merged(self, items: list[_Pending]) -> None:
        live = [i for i in items if i.state != _DONE]
        if len(live) <= 1:
            for item in live:
                await self._run_one(item)
            return
        names = list(live[0].inputs)
        merged = {n: np.concatenate([i.inputs[n] for i in live]) for n in names}
        total = sum(i.rows for i in live)
        if self.metrics is not None:
            self.metrics.observe_batch(total, len(live))
        try:
            out = await self.worker.predict(merged)
        except Exception as exc:
            # One bad request must not fail its neighbours: run them one by one.
            log.debug("batch failed; retrying its requests one by one",
                      extra={"fields": {"model": self.worker.label, "error": str(exc)}})
            for item in live:
                await self._run_one(item)
            return
        if any(v.ndim == 0 or v.shape[0] != total for v in out.values()):
            self.batchable = False
            log.warning("model outputs do not keep one row per input row; batching turned off",
                        extra={"fields": {"model": self.worker.label}})
            for item in live:
                await self._run_one(item)
            return
        start = 0
        for item in live:
            end = start + item.rows
            self._finish(item, {k: v[start:end] for k, v in out.items()})
            start = end

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
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
        while self._queue:
            item = self._queue.popleft()
            self._finish(item, error=ModelNotReadyError(f"model {self.worker.label} {reason}"))
        self._queued_rows = 0
