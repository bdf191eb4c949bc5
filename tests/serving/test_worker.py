"""ModelWorker: long-lived threads; each batch's result reaches its own caller on the loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, PoisonModel

from modelpod.errors import InferenceError, ModelInputError
from modelpod.model import Batch
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
