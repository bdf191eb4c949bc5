"""Batcher: rows (not requests) bound a batch, each caller gets its own rows, overload and timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, PoisonModel

from modelpod.errors import InferenceTimeoutError, ModelInputError, ModelNotReadyError, OverloadedError
from modelpod.model import Batch
from modelpod.serving.batcher import Batcher
from modelpod.serving.config import BatchPolicy
from modelpod.serving.worker import ModelWorker

pytestmark = pytest.mark.asyncio


def rows(n: int, start: float = 0.0) -> Batch:
    return {"x": (np.arange(2 * n, dtype=np.float32).reshape(n, 2) + start)}


async def until(check: Callable[[], Any], what: str, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(0.002)


def make(model: EchoModel, **policy: Any) -> Batcher:
    return Batcher(ModelWorker(model, "m"), BatchPolicy(**policy))


async def test_queued_requests_merge_and_each_gets_its_own_rows() -> None:
    model = GatedModel()
    b = make(model, max_batch_rows=16, max_batch_wait_ms=0)
    first = asyncio.ensure_future(b.submit(rows(1, start=-1000)))
    await until(lambda: model.entered == 1, "the first batch to start")
    sizes = [1, 3, 2, 4]
    others = [asyncio.ensure_future(b.submit(rows(n, start=100 * i))) for i, n in enumerate(sizes)]
    await until(lambda: b.queue_depth == len(sizes), "the others to queue")
    model.gate.set()
    results = await asyncio.gather(first, *others)
    assert model.batches == [1, sum(sizes)]
    for i, (n, out) in enumerate(zip(sizes, results[1:], strict=True)):
        np.testing.assert_array_equal(out["y"], rows(n, start=100 * i)["x"])
        assert out["batch_rows"].tolist() == [sum(sizes)] * n
    np.testing.assert_array_equal(results[0]["y"], rows(1, start=-1000)["x"])


async def test_batches_never_exceed_max_rows_and_a_big_request_runs_alone() -> None:
    model = GatedModel()
    b = make(model, max_batch_rows=4, max_batch_wait_ms=0)
    blocker = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.entered == 1, "the first batch to start")
    sizes = [3, 2, 9, 1, 1]
    futs = [asyncio.ensure_future(b.submit(rows(n, start=10 * i))) for i, n in enumerate(sizes)]
    await until(lambda: b.queue_depth == len(sizes), "the rest to queue")
    model.gate.set()
    results = await asyncio.gather(blocker, *futs)
    # FIFO: [3] (3+2 > 4), [2], [9] alone, [1, 1].
    assert model.batches == [1, 3, 2, 9, 2]
    for i, n in enumerate(sizes):
        np.testing.assert_array_equal(results[i + 1]["y"], rows(n, start=10 * i)["x"])


async def test_different_trailing_shapes_are_not_merged() -> None:
    model = GatedModel()
    b = make(model, max_batch_rows=32, max_batch_wait_ms=0)
    blocker = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.entered == 1, "the first batch")
    a = asyncio.ensure_future(b.submit({"x": np.zeros((2, 3), dtype=np.float32)}))
    c = asyncio.ensure_future(b.submit(rows(2)))
    await until(lambda: b.queue_depth == 2, "both to queue")
    model.gate.set()
    out_a, out_c = (await asyncio.gather(blocker, a, c))[1:]
    assert out_a["y"].shape == (2, 3) and out_c["y"].shape == (2, 2)
    assert model.batches == [1, 2, 2]


async def test_a_lone_request_is_not_delayed_by_the_wait() -> None:
    model = EchoModel()
    # A wait far longer than the test timeout: a lone request must not sit through it.
    b = make(model, max_batch_rows=32, max_batch_wait_ms=600_000)
    for i in range(3):
        out = await b.submit(rows(1, start=i))
        np.testing.assert_array_equal(out["y"], rows(1, start=i)["x"])


async def test_full_queue_is_refused_at_once() -> None:
    model = GatedModel()
    b = make(model, max_batch_rows=1, max_queue=2)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.entered == 1, "the first batch")
    queued = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(2)]
    await until(lambda: b.queue_depth == 2, "two to queue")
    with pytest.raises(OverloadedError) as info:
        await b.submit(rows(1))
    assert info.value.http_status == 503 and info.value.retry_after_s >= 1
    model.gate.set()
    await asyncio.gather(running, *queued)


async def test_timeout_answers_504_and_frees_the_queue_slot() -> None:
    model = GatedModel()
    b = make(model, max_batch_rows=1, timeout_s=0.05)
    running = asyncio.ensure_future(b.submit(rows(1)))
    queued = asyncio.ensure_future(b.submit(rows(1)))
    with pytest.raises(InferenceTimeoutError):
        await queued
    assert b.queue_depth == 0
    with pytest.raises(InferenceTimeoutError):
        await running  # still running in its thread; the caller is answered anyway
    model.gate.set()
    await until(lambda: b.inflight == 0 and model.batches, "the running batch to end")


async def test_one_bad_request_does_not_fail_its_batch() -> None:
    model = PoisonModel()
    gated = GatedModel()
    b = Batcher(ModelWorker(gated, "m"), BatchPolicy(max_batch_rows=16))
    blocker = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: gated.entered == 1, "the first batch")
    b.worker.model = model  # the queued requests meet the model that rejects negatives
    good = [asyncio.ensure_future(b.submit(rows(2, start=10 * i))) for i in range(3)]
    bad = asyncio.ensure_future(b.submit(rows(1, start=-50)))
    await until(lambda: b.queue_depth == 4, "all to queue")
    gated.gate.set()
    await blocker
    for i, fut in enumerate(good):
        np.testing.assert_array_equal((await fut)["y"], rows(2, start=10 * i)["x"])
    with pytest.raises(ModelInputError, match="negative input"):
        await bad


async def test_outputs_without_rows_turn_batching_off() -> None:
    class Summing(GatedModel):
        def predict(self, inputs: Any) -> Batch:
            self.entered += 1
            self.gate.wait(60)
            self.batches.append(len(inputs["x"]))
            return {"total": np.asarray(float(inputs["x"].sum()))}

    model = Summing()
    b = make(model, max_batch_rows=16)
    blocker = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.entered == 1, "the first batch")
    futs = [asyncio.ensure_future(b.submit(rows(2, start=i))) for i in range(2)]
    await until(lambda: b.queue_depth == 2, "both to queue")
    model.gate.set()
    outs = await asyncio.gather(blocker, *futs)
    assert [float(o["total"]) for o in outs[1:]] == [float(rows(2, start=i)["x"].sum()) for i in range(2)]
    assert not b.batchable


async def test_close_fails_queued_requests() -> None:
    model = GatedModel()
    b = make(model, max_batch_rows=1)
    running = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.entered == 1, "the first batch")
    queued = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: b.queue_depth == 1, "one to queue")
    b.close()
    with pytest.raises(ModelNotReadyError):
        await queued
    with pytest.raises(ModelNotReadyError):
        await b.submit(rows(1))
    model.gate.set()
    await running
    await b.wait_idle()


async def test_each_request_times_out_on_its_own_deadline() -> None:
    # One timer sweeps the deadlines: it must re-arm for later requests, and after going idle.
    model = GatedModel()
    b = make(model, max_batch_rows=1, timeout_s=0.05)
    first = asyncio.ensure_future(b.submit(rows(1)))
    await until(lambda: model.entered == 1, "the first batch to start")
    second = asyncio.ensure_future(b.submit(rows(1)))
    with pytest.raises(InferenceTimeoutError):
        await first
    with pytest.raises(InferenceTimeoutError):
        await second
    assert b.inflight == 0 and b.queue_depth == 0
    model.gate.set()
    await until(lambda: model.batches == [1], "the running batch to end")  # the queued one never ran
    third = await b.submit(rows(1, start=3))  # answered in time: no stale deadline fires
    np.testing.assert_array_equal(third["y"], rows(1, start=3)["x"])
    model.gate.clear()
    late = asyncio.ensure_future(b.submit(rows(1)))
    with pytest.raises(InferenceTimeoutError):
        await late
    model.gate.set()
    await until(lambda: b.inflight == 0 and len(model.batches) == 3, "the last batch to end")


async def test_answered_requests_leave_the_deadline_queue() -> None:
    b = make(EchoModel(), max_batch_rows=8, max_batch_wait_ms=0)
    outs = await asyncio.gather(*(b.submit(rows(1, start=i)) for i in range(50)))
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], rows(1, start=i)["x"])
    assert not b._deadlines  # nothing kept alive after its answer
