"""Images of different sizes from different requests share one model run after letterboxing (a
detector with a free batch dimension, behind the server's Batcher), each request keeping its own
parameters and getting exactly its own boxes back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from graphs import batched_detector, classifier
from imgutil import canvas, encode

from modelpod import api
from modelpod.errors import InvalidRequestError
from modelpod.model import Model
from modelpod.protocols.codec import InferRequest
from modelpod.serving import BatchPolicy, InferenceEngine
from modelpod.settings import Settings
from modelpod.store import Store

pytestmark = pytest.mark.timeout(120)

# (height, width, rectangle): each request's image has its own size and place.
SCENES = [(25, 40, (3, 4, 17, 20)), (90, 50, (10, 30, 40, 80)), (64, 64, (20, 20, 50, 33)),
          (33, 120, (60, 5, 100, 30)), (48, 48, (1, 1, 47, 47))]


def _images(*scenes: tuple[int, int, tuple[int, int, int, int]]) -> np.ndarray[Any, Any]:
    arr = np.empty(len(scenes), dtype=object)
    arr[:] = [encode(canvas(h, w, box)) for h, w, box in scenes]
    return arr


class Gate:
    """Counts the model's runs and holds the first one until ``open`` (so the rest queue meanwhile)."""

    def __init__(self, model: Model) -> None:
        self.pipeline: Any = model.pipeline  # type: ignore[attr-defined]
        self.inner = self.pipeline.run
        self.runs: list[int] = []
        self.started = threading.Event()
        self.opened = threading.Event()
        self.pipeline.run = self

    def __call__(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.runs.append(int(batch.shape[0]))
        if len(self.runs) == 1:
            self.started.set()
            assert self.opened.wait(30)
        out: np.ndarray[Any, Any] = self.inner(batch)
        return out


@contextlib.asynccontextmanager
async def serving(path: Path, name: str, store: Store) -> AsyncIterator[tuple[InferenceEngine, Gate]]:
    """The model at ``path`` packed, loaded, gated and served by an in-process engine."""
    api.pack(path, name, store=store)
    model = api.load(name, store=store)
    gate = Gate(model)
    engine = InferenceEngine(Settings())
    engine.add_model(model, name=name, version=1, policy=BatchPolicy(max_batch_rows=32, max_batch_wait_ms=0))
    await engine.start()
    try:
        yield engine, gate
    finally:
        gate.opened.set()
        await engine.close()


async def _queue_behind_first(engine: InferenceEngine, gate: Gate, name: str,
                              requests: list[InferRequest]) -> list[Any]:
    """Send the first request, wait until it runs, send the rest (they queue), then let it go."""
    first = asyncio.ensure_future(engine.infer(name, None, requests[0]))
    await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 30)
    rest = [asyncio.ensure_future(engine.infer(name, None, r)) for r in requests[1:]]
    await asyncio.sleep(0)  # let them reach the batcher's queue
    entry = engine.resolve(name)
    assert entry.batcher is not None and entry.batcher.queue_depth == len(requests) - 1
    gate.opened.set()
    return list(await asyncio.gather(first, *rest, return_exceptions=True))


@pytest.mark.asyncio
async def test_requests_of_different_sizes_share_one_run(tmp_path: Path, store: Store) -> None:
    async with serving(batched_detector(tmp_path / "det.onnx"), "bdet", store) as (engine, gate):
        params: list[dict[str, Any]] = [{}, {"classes": [1]}, {"conf": 0.55}, {"max_det": 1}, {"classes": "0"}]
        requests = [InferRequest({"images": _images(SCENES[0])}, parameters=params[0]),
                    InferRequest({"images": _images(SCENES[1], SCENES[2])}, parameters=params[1]),
                    InferRequest({"images": _images(SCENES[3])}, parameters=params[2]),
                    InferRequest({"images": _images(SCENES[4])}, parameters=params[3]),
                    InferRequest({"images": _images(SCENES[2], SCENES[0])}, parameters=params[4])]
        results = await _queue_behind_first(engine, gate, "bdet", requests)
        # The first request ran alone; the other four (six images) in one run.
        assert gate.runs == [1, 6]
        text = engine.metrics.render().decode()
        assert 'modelpod_batch_requests_sum{model="bdet",version="1"} 5' in text
        assert 'modelpod_batch_requests_count{model="bdet",version="1"} 2' in text
        # Each request: its own images' boxes, in their original pixels, with its own parameters.
        # The graph answers each box as class 1 (score 0.9) and class 0 (score 0.5).
        want_ids = [[1, 0], [1], [1], [1], [0]]  # defaults; classes=[1]; conf 0.55; max_det=1; classes="0"
        scenes = [[SCENES[0]], [SCENES[1], SCENES[2]], [SCENES[3]], [SCENES[4]], [SCENES[2], SCENES[0]]]
        for result, ids, shown in zip(results, want_ids, scenes, strict=True):
            out = result.outputs
            assert out["detections"].tolist() == [len(ids)] * len(shown)
            assert out["class_ids"].tolist() == ids * len(shown)
            assert "annotated" not in out
            for i, (_, _, box) in enumerate(shown):
                for row in out["boxes"][i * len(ids):(i + 1) * len(ids)]:
                    np.testing.assert_allclose(row, box, atol=1.0)


@pytest.mark.asyncio
async def test_a_bad_image_fails_only_its_own_request(tmp_path: Path, store: Store) -> None:
    async with serving(batched_detector(tmp_path / "det.onnx"), "bdet2", store) as (engine, gate):
        bad = np.empty(1, dtype=object)
        bad[0] = encode(canvas(20, 20, (2, 2, 9, 9)))[:40]  # a truncated PNG
        requests = [InferRequest({"images": _images(SCENES[0])}),
                    InferRequest({"images": _images(SCENES[1])}, parameters={"annotate": True}),
                    InferRequest({"images": bad}),
                    InferRequest({"images": _images(SCENES[3])})]
        results = await _queue_behind_first(engine, gate, "bdet2", requests)
        assert isinstance(results[2], InvalidRequestError) and "images[0]" in str(results[2])
        for k in (0, 1, 3):
            out = results[k].outputs
            assert out["detections"].tolist() == [2]
            np.testing.assert_allclose(out["boxes"][0], SCENES[k][2], atol=1.0)
        assert results[1].outputs["annotated"].shape == (1,)  # only the request that asked for it
        assert "annotated" not in results[3].outputs


@pytest.mark.asyncio
async def test_classifier_requests_share_a_run_and_keep_their_top_k(tmp_path: Path, store: Store) -> None:
    from onnx import load, save

    path = classifier(tmp_path / "cls.onnx")
    proto = load(str(path))  # the same graph with a free batch dimension
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    save(proto, str(path))
    colours = {"red": (200, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 200)}

    def image(name: str) -> np.ndarray[Any, Any]:
        arr = np.empty(1, dtype=object)
        arr[0] = encode(np.full((20 + len(name), 30, 3), colours[name], dtype=np.uint8))
        return arr

    async with serving(path, "bcls", store) as (engine, gate):
        requests = [InferRequest({"images": image("red")}), InferRequest({"images": image("green")},
                                                                         parameters={"top_k": 1}),
                    InferRequest({"images": image("blue")}, parameters={"top_k": 2})]
        results = await _queue_behind_first(engine, gate, "bcls", requests)
        assert gate.runs == [1, 2]
        assert results[1].outputs["class_names"].tolist() == [[b"green"]]
        assert results[2].outputs["class_names"].shape == (1, 2) and results[2].outputs["class_names"][0, 0] == b"blue"


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_under_process_isolation_each_request_gets_its_own_boxes(tmp_path: Path, store: Store) -> None:
    from modelpod.serving.config import ServeConfig

    api.pack(batched_detector(tmp_path / "det.onnx"), "pdet", store=store)
    settings = Settings(home=tmp_path / "home", max_batch_wait_ms=0)
    engine = InferenceEngine(settings, ServeConfig.from_settings(settings, {"models": {"pdet": {
        "isolation": "process", "max_batch_rows": 32}}}))
    engine.add("pdet")
    await engine.start()
    try:
        params: list[dict[str, Any]] = [{"max_det": 1}, {}, {"classes": [1]}, {"conf": 0.55}, {"classes": "0"}]
        shown = [[SCENES[4]], [SCENES[0]], [SCENES[1], SCENES[2]], [SCENES[3]], [SCENES[2], SCENES[0]]]
        # All sent at once: the first runs alone on the one replica, the rest queue and merge (their
        # images have more boxes than there are images: only the model's own cut can split them).
        results = await asyncio.gather(*[engine.infer("pdet", None, InferRequest({"images": _images(*s)}, parameters=p))
                                         for s, p in zip(shown, params, strict=True)])
        text = engine.metrics.render().decode()
        assert 'modelpod_batch_requests_sum{model="pdet",version="1"} 5' in text
        assert 'modelpod_batch_requests_count{model="pdet",version="1"} 5' not in text  # some shared a run
        want_ids = [[1], [1, 0], [1], [1], [0]]
        for result, ids, scenes in zip(results, want_ids, shown, strict=True):
            out = result.outputs
            assert out["detections"].tolist() == [len(ids)] * len(scenes)
            assert out["class_ids"].tolist() == ids * len(scenes)
            for i, (_, _, box) in enumerate(scenes):
                for row in out["boxes"][i * len(ids):(i + 1) * len(ids)]:
                    np.testing.assert_allclose(row, box, atol=1.0)
    finally:
        await engine.close()


def test_the_server_side_cut_comes_from_the_manifest_options_alone() -> None:
    from modelpod.model import with_parameters
    from modelpod.vision.task import splitter

    assert splitter({}) is None and splitter({"file": "m.onnx"}) is None
    cut = splitter({"vision": {"task": "classify", "names": ["a", "b", "c", "d"]}, "top_k": "3"})
    assert cut is not None
    ids = np.array([[3, 2, 1, 0], [0, 1, 2, 3], [1, 0, 2, 3]], dtype=np.int64)
    out = {"class_ids": ids, "class_names": ids.astype(bytes), "probabilities": np.ones((3, 4), np.float32)}
    one = np.empty(1, dtype=object)
    two = np.empty(2, dtype=object)
    parts = [with_parameters({"images": one}, {}), with_parameters({"images": two}, {"top_k": 1})]
    first, second = cut(out, parts)
    assert first["class_ids"].tolist() == [[3, 2, 1]]  # the pod's top_k option: 3
    assert second["class_ids"].tolist() == [[0], [1]]  # the request's own top_k
