"""ModelWorker: long-lived threads; each batch's result reaches its own caller on the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, PoisonModel

from modelpod.errors import InferenceError, ModelInputError
from modelpod.model import Batch, Model
from modelpod.serving.worker import ModelWorker

pytestmark = pytest.mark.asyncio


def rows(n: int, start: float) -> Batch:
    return {"x": np.arange(2 * n, dtype=np.float32).reshape(n, 2) + start}


async def test_concurrent_batches_come_back_to_their_own_callers() -> None:
    worker = ModelWorker(EchoModel(), "m", threads=3)
    try:
        outs = await asyncio.gather(*(worker.predict(rows(1 + i % 4, 10.0 * i)) for i in range(200)))
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out["y"], rows(1 + i % 4, 10.0 * i)["x"])
    finally:
        worker.close()
    assert worker.join(30)


async def test_results_are_delivered_on_the_loop_thread() -> None:
    worker = ModelWorker(EchoModel(), "m")
    loop = asyncio.get_running_loop()
    got: asyncio.Future[tuple[int, Batch | None, BaseException | None]] = loop.create_future()

    def done(out: Batch | None, err: BaseException | None) -> None:
        got.set_result((threading.get_ident(), out, err))

    worker.submit(rows(2, 0), done, loop)
    ident, out, err = await got
    assert ident == threading.get_ident() and err is None and out is not None
    worker.close()
    assert worker.join(30)


async def test_a_model_error_fails_only_its_batch() -> None:
    worker = ModelWorker(PoisonModel(), "m")
    good_before = asyncio.ensure_future(worker.predict(rows(2, 1)))
    bad = asyncio.ensure_future(worker.predict(rows(1, -100)))
    good_after = asyncio.ensure_future(worker.predict(rows(3, 5)))
    with pytest.raises(ModelInputError, match="negative input"):
        await bad
    np.testing.assert_array_equal((await good_before)["y"], rows(2, 1)["x"])
    np.testing.assert_array_equal((await good_after)["y"], rows(3, 5)["x"])
    worker.close()
    assert worker.join(30)


def _collect(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[Batch], Any]:
    fut: asyncio.Future[Batch] = loop.create_future()

    def done(out: Batch | None, err: BaseException | None) -> None:
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(out or {})

    return fut, done


async def test_close_drains_the_batches_already_handed_over() -> None:
    model = GatedModel()
    worker = ModelWorker(model, "m")
    loop = asyncio.get_running_loop()
    running, done_running = _collect(loop)
    queued, done_queued = _collect(loop)
    worker.submit(rows(1, 0), done_running, loop)
    worker.submit(rows(2, 7), done_queued, loop)
    worker.close()
    with pytest.raises(InferenceError, match="closed"):
        worker.submit(rows(1, 0), lambda out, err: None, loop)
    model.gate.set()
    np.testing.assert_array_equal((await running)["y"], rows(1, 0)["x"])
    np.testing.assert_array_equal((await queued)["y"], rows(2, 7)["x"])
    assert worker.join(30)


async def test_non_dict_outputs_are_an_inference_error() -> None:
    class Bad(EchoModel):
        def predict(self, inputs: Any) -> Any:
            return [1, 2]

    worker = ModelWorker(Bad(), "m")
    with pytest.raises(InferenceError, match="not a dict"):
        await worker.predict(rows(1, 0))
    worker.close()
    assert worker.join(30)


async def test_outputs_are_numpy_arrays_with_string_names() -> None:
    class Loose(EchoModel):
        def predict(self, inputs: Any) -> Any:
            return {0: [1.0, 2.0], "z": np.zeros(2)}

    worker = ModelWorker(Loose(), "m")
    out = await worker.predict(rows(2, 0))
    assert set(out) == {"0", "z"} and all(isinstance(v, np.ndarray) for v in out.values())
    worker.close()
    assert worker.join(30)


async def test_a_closed_loop_does_not_kill_the_thread() -> None:
    model = GatedModel()
    worker = ModelWorker(model, "m")
    gone = asyncio.new_event_loop()
    worker.submit(rows(1, 0), lambda out, err: None, gone)
    gone.close()  # its caller went away before the batch finished
    model.gate.set()
    out = await worker.predict(rows(2, 3))  # the same thread serves the next batch
    np.testing.assert_array_equal(out["y"], rows(2, 3)["x"])
    worker.close()
    assert worker.join(30)


# -- inline: a fast framework model's batches run on the event loop ------------------------------
class ThreadNoting(Model):
    """Notes the thread of each predict; ``busy_s`` of computing per batch (a slow model)."""

    computes_only = True

    def __init__(self, busy_s: float = 0.0, fail_on: float | None = None) -> None:
        super().__init__()
        self.busy_s = busy_s
        self.fail_on = fail_on
        self.threads: list[int] = []

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        self.threads.append(threading.get_ident())
        x = inputs["x"]
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError("refused value")
        end = time.perf_counter() + self.busy_s
        while time.perf_counter() < end:  # computing, not waiting
            pass
        return {"y": np.array(x, copy=True)}


async def test_a_fast_framework_model_runs_its_batches_on_the_loop() -> None:
    model = ThreadNoting()
    worker = ModelWorker(model, "m", inline_s=0.5)
    loop_thread = threading.get_ident()
    for i in range(5):
        out = await worker.predict(rows(3, i))
        np.testing.assert_array_equal(out["y"], rows(3, i)["x"])
    assert model.threads[0] != loop_thread  # a size never seen runs on the thread first
    assert model.threads[1:] == [loop_thread] * 4
    out = await worker.predict(rows(7, 0))  # a bigger batch than measured: the thread again
    assert model.threads[-1] != loop_thread
    worker.close()
    assert worker.join(30)


async def test_results_of_an_inline_batch_arrive_after_submit_returns() -> None:
    model = ThreadNoting()
    worker = ModelWorker(model, "m", inline_s=0.5)
    await worker.predict(rows(2, 0))
    loop = asyncio.get_running_loop()
    got: list[Batch | None] = []
    worker.submit(rows(2, 1), lambda out, err: got.append(out), loop)
    assert got == []  # the caller is still in submit: the answer comes on the loop's next turn
    deadline = loop.time() + 10
    while not got and loop.time() < deadline:
        await asyncio.sleep(0)
    assert got and got[0] is not None and model.threads[-1] == threading.get_ident()
    worker.close()


async def test_a_slow_model_stays_on_its_thread_and_one_that_slows_down_goes_back() -> None:
    model = ThreadNoting(busy_s=0.02)
    worker = ModelWorker(model, "m", inline_s=0.005)
    for i in range(3):
        await worker.predict(rows(2, i))
    assert threading.get_ident() not in model.threads
    model.busy_s = 0.0
    await worker.predict(rows(2, 0))  # measured fast on the thread
    await worker.predict(rows(2, 0))  # so this one runs inline ...
    assert model.threads[-1] == threading.get_ident()
    model.busy_s = 0.02
    await worker.predict(rows(2, 0))  # ... and is measured slow there
    await worker.predict(rows(2, 0))
    assert model.threads[-1] != threading.get_ident()  # back on the thread
    worker.close()
    assert worker.join(30)


async def test_custom_code_and_a_zero_limit_never_run_inline() -> None:
    loop_thread = threading.get_ident()
    for model, inline_s in ((EchoModel(), 0.5), (ThreadNoting(), 0.0)):
        seen: list[int] = []
        original = model.predict

        def noting(inputs: Mapping[str, np.ndarray[Any, Any]], original: Any = original,
                   seen: list[int] = seen) -> Batch:
            seen.append(threading.get_ident())
            return original(inputs)  # type: ignore[no-any-return]

        model.predict = noting  # type: ignore[method-assign]
        worker = ModelWorker(model, "m", inline_s=inline_s)
        for i in range(4):
            await worker.predict(rows(2, i))
        assert len(seen) == 4 and loop_thread not in seen
        worker.close()
        assert worker.join(30)


async def test_an_inline_model_error_reaches_its_caller_and_the_next_batch_still_runs() -> None:
    model = ThreadNoting(fail_on=-1.0)
    worker = ModelWorker(model, "m", inline_s=0.5)
    await worker.predict(rows(2, 0))
    with pytest.raises(ModelInputError, match="refused value"):
        await worker.predict({"x": np.full((2, 2), -1.0, dtype=np.float32)})
    assert model.threads[-1] == threading.get_ident()
    out = await worker.predict(rows(2, 5))
    np.testing.assert_array_equal(out["y"], rows(2, 5)["x"])
    worker.close()

