"""ModelRegistry and the engine around it: versions and aliases, failed loads, lazy loads, LRU eviction."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from servutil import BigModel, BrokenModel, EchoModel

from modelpod.errors import ModelNotReadyError, NotFoundError
from modelpod.protocols.codec import InferRequest
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.registry import ModelState, rss_bytes
from modelpod.settings import Settings
from modelpod.store import PodRecord

pytestmark = pytest.mark.asyncio
X = np.zeros((1, 2), dtype=np.float32)


def request() -> InferRequest:
    return InferRequest({"x": X})


async def test_failed_load_leaves_that_model_unready_and_others_serving() -> None:
    engine = InferenceEngine(Settings())
    engine.add_model(BrokenModel(), name="broken", version=1)
    engine.add_model(EchoModel(), name="echo", version=1)
    await engine.start()
    assert not engine.model_ready("broken") and engine.model_ready("echo")
    assert not engine.ready()  # OIP: the server is ready when all its models are
    with pytest.raises(ModelNotReadyError, match="weights are corrupt"):
        await engine.infer("broken", None, request())
    out = await engine.infer("echo", None, request())
    np.testing.assert_array_equal(out.outputs["y"], X)
    index = {r["name"]: r for r in engine.repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE" and "corrupt" in index["broken"]["reason"]
    assert index["echo"]["state"] == "READY"
    await engine.close()


async def test_versions_and_aliases_resolve_in_one_place(served_home: tuple[Path, PodRecord]) -> None:
    home, rec = served_home
    engine = InferenceEngine(Settings(home=home, lazy_load=True))
    engine.add("lr@production")
    engine.add_model(EchoModel(), name="lr", version=7)
    await engine.start()
    assert engine.resolve("lr").version == 7  # no version: the highest that can serve
    assert engine.resolve("lr", "1").version == 1
    assert engine.resolve("lr", "production").version == rec.version
    with pytest.raises(NotFoundError):
        engine.resolve("lr", "3")
    with pytest.raises(NotFoundError):
        engine.resolve("lr", "staging")
    with pytest.raises(NotFoundError):
        engine.resolve("nope")
    meta = engine.model_metadata("lr", "1")
    assert meta["versions"] == ["1", "7"] and meta["platform"] == "sklearn"
    await engine.close()


async def test_lazy_model_loads_on_first_request(served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    engine = InferenceEngine(Settings(home=home, lazy_load=True))
    entry = engine.add("lr")
    await engine.start()
    assert entry.state is ModelState.UNAVAILABLE and engine.model_ready("lr")
    x = np.random.default_rng(1).normal(size=(3, 20)).astype(np.float32)
    out = await engine.infer("lr", None, InferRequest({"input-0": x}))
    assert entry.state is ModelState.READY and out.outputs["output-0"].shape == (3,)
    await engine.close()


async def test_pod_directory_serves_without_a_store(served_home: tuple[Path, PodRecord], tmp_path: Path) -> None:
    home, rec = served_home
    from modelpod.store import Store

    pod_dir = Store(home).open(rec.ref).path
    engine = InferenceEngine(Settings(home=tmp_path / "no-store"))
    entry = engine.add(str(pod_dir))
    await engine.start()
    assert entry.name == "lr" and entry.version is None and entry.ready
    assert not (tmp_path / "no-store").exists()  # an image has no store: none is made
    await engine.close()


async def test_lru_eviction_keeps_memory_under_the_budget() -> None:
    if rss_bytes() == 0:
        pytest.skip("no /proc/self/statm: RSS cannot be measured here")
    size = 48 << 20
    engine = InferenceEngine(Settings(memory_budget_bytes=int(size * 2.5)))
    models = {name: BigModel(size) for name in ("a", "b", "c")}
    for name, model in models.items():
        engine.add_model(model, name=name, version=1)
    await engine.start()
    # The third load evicts the least recently used.
    entries = {n: engine.resolve(n) for n in models}
    assert [n for n, e in entries.items() if e.ready] == ["b", "c"]
    assert entries["a"].state is ModelState.UNAVAILABLE and "memory budget" in entries["a"].reason
    assert engine.model_ready("a")  # evicted models load again on demand
    await engine.infer("b", None, request())  # b is now the most recently used
    await engine.infer("a", None, request())  # loads a again: c goes
    assert entries["a"].ready and entries["b"].ready and not entries["c"].ready
    assert models["c"].weights is None  # unloaded for real
    assert engine.registry.used_bytes() <= int(size * 2.5)
    assert entries["c"].metrics.evictions.value == 1
    await engine.close()


async def test_unload_and_load_through_the_repository(served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    engine = InferenceEngine(Settings(home=home))
    engine.add_model(EchoModel(), name="echo", version=1)
    await engine.start()
    await engine.unload_model("echo")
    assert not engine.model_ready("echo")
    with pytest.raises(ModelNotReadyError):
        await engine.infer("echo", None, request())
    await engine.load_model("echo")
    assert engine.model_ready("echo")
    # A store model that was not served yet.
    entry = await engine.load_model("lr")
    assert entry.ready and entry.version == 1
    rows = {(r["name"], r["version"]): r["state"] for r in engine.repository_index()}
    assert rows[("lr", "1")] == "READY" and rows[("echo", "1")] == "READY"
    with pytest.raises(NotFoundError):
        await engine.load_model("missing")
    await engine.close()


async def test_draining_refuses_new_requests() -> None:
    engine = InferenceEngine(Settings())
    engine.add_model(EchoModel(), name="echo", version=1)
    await engine.start()
    engine.begin_drain()
    assert not engine.ready() and engine.live()
    with pytest.raises(ModelNotReadyError, match="shutting down"):
        await engine.infer("echo", None, request())
    await engine.close()


class _Node:
    """A reference cycle: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


class CyclicModel(EchoModel):
    """Loads a structure that is a reference cycle, as framework objects often are."""

    def load(self) -> None:
        self.graph: _Node | None = _Node()
        self.collector_during_load = gc.isenabled()
        super().load()

    def unload(self) -> None:
        self.graph = None
        super().unload()


async def serve_cyclic() -> tuple[InferenceEngine, CyclicModel]:
    """An engine serving one CyclicModel, loaded, with nothing frozen before it."""
    gc.unfreeze()
    model = CyclicModel()
    engine = InferenceEngine(Settings())
    engine.add_model(model, name="cyclic", version=1)
    await engine.start()
    return engine, model


async def test_loaded_models_are_frozen_out_of_collections_and_collected_after_unload() -> None:
    engine, model = await serve_cyclic()
    try:
        assert model.graph is not None
        graph = weakref.ref(model.graph)
        # The import-heavy load ran without collections; the collector is back on afterwards.
        assert model.collector_during_load is False and gc.isenabled()
        # Everything alive after the load (the model's cycle among it) is out of the collector's
        # generations, so a full collection no longer walks it while requests wait.
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        gc.collect()
        # Nothing was thawed (a thaw empties the permanent generation); other threads left by earlier
        # tests may free a few frozen objects meanwhile, which lowers the count by those alone.
        assert graph() is not None and frozen - gc.get_freeze_count() < 1000
        await engine.unload_model("cyclic")
        # The unloaded model's cycle was thawed and collected; the rest is frozen again.
        assert graph() is None
        assert gc.get_freeze_count() > 0
    finally:
        await engine.close()
        gc.unfreeze()


async def test_a_failed_load_turns_the_collector_back_on() -> None:
    engine = InferenceEngine(Settings())
    engine.add_model(BrokenModel(), name="broken", version=1)
    await engine.start()
    assert not engine.model_ready("broken") and gc.isenabled()
    await engine.close()


async def test_a_stopping_server_skips_the_collection_per_model() -> None:
    engine, model = await serve_cyclic()
    assert model.graph is not None
    graph = weakref.ref(model.graph)
    await engine.close(collect=False)
    try:
        # Unloaded, but its cycle was left frozen for the process's exit rather than collected.
        assert model.graph is None and graph() is not None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.collect()
    assert graph() is None
