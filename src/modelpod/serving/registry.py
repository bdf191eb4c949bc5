"""ModelRegistry: the model versions a server knows, loading them, and evicting them under a budget.

An entry is registered from a store reference, a pod directory or a ready ``Model`` object, and is
loaded at start, on its first request (lazy, or after an eviction), or through the repository API.
Memory per model is the process RSS growth measured around its load, at least its weights' size;
when a load would pass ``memory_budget_bytes`` the least recently used idle models are unloaded
first. Loads run one at a time in a thread, so the RSS deltas do not overlap and the loop stays free.

Loads run with the cyclic collector off, and after every load the heap is frozen (``gc.freeze``):
a framework import leaves some 10^5 long-lived container objects, and each full collection walked
them all, tens of milliseconds with the event loop stopped, which showed as the p99 latency under
load; the collections during the import itself cost a tenth of a cold start. Frozen objects are
never examined by the cyclic collector; an unload thaws them, collects what the model left, and
freezes again.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

from modelpod.errors import ConflictError, ModelNotReadyError, NotFoundError, OverloadedError, UsageError
from modelpod.frameworks import require
from modelpod.inputs import InputCheck
from modelpod.model import Model
from modelpod.pod import MANIFEST_NAME, Manifest, Pod, Signature, read_record
from modelpod.serving.batcher import Batcher
from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.envs import EnvChoice, choose
from modelpod.serving.metrics import ModelMetrics, ServingMetrics
from modelpod.serving.scaling import ReplicaPolicy
from modelpod.serving.worker import BatchWorker, ModelWorker, rss_bytes
from modelpod.settings import Settings
from modelpod.store import Ref, Store
from modelpod.trust.gate import load_model
from modelpod.trust.policy import TrustPolicy

if TYPE_CHECKING:  # the replica machinery is imported by a process load only (serving/replica_load.py)
    from modelpod.serving.replicas import ReplicaSet

log = logging.getLogger("modelpod.serving")
T = TypeVar("T")


class ModelState(str, Enum):
    """Triton's repository states."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelSource:
    """Where an entry's model comes from: a pinned store ref, a pod directory, or a Model object."""

    ref: str | None = None
    path: Path | None = None
    model: Model | None = None


class ModelEntry:
    """One model version in the server. Mutable; owned by the registry and the event loop."""

    def __init__(self, name: str, version: int | None, source: ModelSource, *, signature: Signature,
                 platform: str, policy: BatchPolicy, metrics: ModelMetrics, manifest: Manifest | None = None,
                 aliases: frozenset[str] = frozenset(), replica_policy: ReplicaPolicy | None = None) -> None:
        self.name = name
        self.version = version
        self.source = source
        self.signature = signature
        self.platform = platform
        self.policy = policy
        self.metrics = metrics
        self.manifest = manifest
        self.aliases = aliases
        self.state = ModelState.UNAVAILABLE
        self.reason = ""
        self.on_demand = True  # may be loaded by a request (lazy, or evicted)
        self.failed = False
        self.model: Model | None = None
        self.worker: BatchWorker | None = None
        self.replica_policy = replica_policy or ReplicaPolicy()  # thread, or processes (serving/scaling.py)
        self.batcher: Batcher | None = None
        self.memory_bytes = 0
        self.load_seconds = 0.0
        self.last_used = 0.0
        self.loading: asyncio.Future[None] | None = None
        self.input_check: InputCheck | None = None  # built by the engine on first use
        self.env: EnvChoice | None = None  # own environment or the server's (serving/envs.py)

    @property
    def replicas(self) -> ReplicaSet | None:
        """The replica processes, when the model runs in them (``isolation: process``)."""
        return replica_set(self.worker)

    @property
    def version_text(self) -> str:
        return "" if self.version is None else str(self.version)

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def available(self) -> bool:
        """Ready, or loadable on the next request."""
        return self.ready or (self.on_demand and not self.failed and self.state is not ModelState.UNLOADING)

    @property
    def batchable(self) -> bool:
        """Rows can be merged when every input has a free first dimension (or no signature says)."""
        if not self.signature.inputs:
            return True
        return all(len(t.shape) >= 1 and t.shape[0] == -1 for t in self.signature.inputs)

    def estimate_bytes(self) -> int:
        weights = self.manifest.weights_bytes() if self.manifest is not None else 0
        return max(self.memory_bytes, weights)

    def __repr__(self) -> str:
        return f"ModelEntry({self.label}, {self.state.value})"


def replica_set(worker: object) -> ReplicaSet | None:
    """``worker`` when it is a ReplicaSet. None while the replica machinery was never imported: a
    server whose models all run on its threads does without it."""
    replicas = sys.modules.get("modelpod.serving.replicas")
    return cast("ReplicaSet", worker) if replicas is not None and isinstance(worker, replicas.ReplicaSet) else None


def _quietly(hook: Callable[[ModelEntry], None], entry: ModelEntry) -> None:
    """Run a load hook; its failure is logged, never the load's."""
    try:
        hook(entry)
    except Exception as exc:
        log.warning("model load hook failed", extra={"fields": {"model": entry.label, "error": repr(exc)}})


class ModelRegistry:
    def __init__(self, settings: Settings, config: ServeConfig, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self._by_name: dict[str, dict[int | None, ModelEntry]] = {}
        self._load_lock = asyncio.Lock()
        self.on_ready: list[Callable[[ModelEntry], None]] = []  # called as each load finishes (observe/)
        self._store: Store | None = None

    # -- registering ------------------------------------------------------------------------------
    def store(self, create: bool = False) -> Store | None:
        """The local store; None when there is none and ``create`` is False (e.g. in an image)."""
        if self._store is None and (create or (self.settings.home / "index.db").is_file()):
            self._store = Store(self.settings.home)
        return self._store

    def trust(self) -> TrustPolicy:
        """The trust policy every pod passes before it is registered and again before it loads."""
        return self.config.trust if self.config.trust is not None else TrustPolicy.from_settings(self.settings)

    def add_ref(self, ref: str) -> ModelEntry:
        """Register a store reference (NAME, NAME:V, NAME@ALIAS, NAME@sha256:...); no load yet.

        Never a directory, whatever the working directory holds: only ``add_path`` reads one."""
        store = self.store(create=True)
        assert store is not None
        rec = store.get(ref)
        self.trust().check_dir(f"pod {rec.ref}", rec.digest, store.open(rec.ref, verify=False).path)
        return self._add_manifest(rec.manifest, rec.version, ModelSource(ref=rec.ref), frozenset(rec.aliases))

    def add_path(self, path: Path) -> ModelEntry:
        """Register the pod directory ``path`` (the command line names it as a path); no load yet."""
        if not (path / MANIFEST_NAME).is_file():
            raise UsageError(f"{path}: no pod directory there (no {MANIFEST_NAME})")
        manifest = Pod.open(path, verify=False).manifest
        self.trust().check_dir(f"pod {manifest.name} ({path})", manifest.digest, path)
        version, aliases = None, frozenset[str]()
        store = self.store()
        if store is not None:
            try:
                rec = store.get(Ref(name="", digest=manifest.digest))
                version, aliases = rec.version, frozenset(rec.aliases)
            except NotFoundError:
                pass
        if version is None:  # an image's pod: its store record was written beside the manifest
            version, recorded = read_record(path, manifest)
            aliases = frozenset(recorded)
        return self._add_manifest(manifest, version, ModelSource(path=path.resolve()), aliases)

    def _add_manifest(self, manifest: Manifest, version: int | None, source: ModelSource,
                      aliases: frozenset[str]) -> ModelEntry:
        entry = self._add(manifest.name, version, source, manifest.signature, manifest.framework,
                          self.config.policy(manifest.name, manifest.serving), manifest, aliases)
        entry.env = choose(manifest.requirements, self.config.env_mode(manifest.name), self.config.wheel_cache)
        if entry.env.own:  # another interpreter: only a replica process can run there
            if not entry.replica_policy.process:
                entry.replica_policy = replace(entry.replica_policy, isolation="process")
            log.info("model gets its own environment", extra={"fields": {
                "model": entry.name, "version": entry.version_text, "why": entry.env.reason}})
        return entry

    def add_model(self, model: Model, name: str | None = None, version: int | None = None,
                  policy: BatchPolicy | None = None) -> ModelEntry:
        """Register a ready ``Model`` object (custom code, tests); it is loaded if it is not yet."""
        name = name or model.name
        manifest = model.pod.manifest if model.pod is not None else None
        policy = policy or self.config.policy(name, manifest.serving if manifest else None)
        platform = manifest.framework if manifest is not None else "python"
        return self._add(name, version, ModelSource(model=model), model.signature, platform, policy, manifest,
                         frozenset())

    def _add(self, name: str, version: int | None, source: ModelSource, signature: Signature, platform: str,
             policy: BatchPolicy, manifest: Manifest | None, aliases: frozenset[str]) -> ModelEntry:
        versions = self._by_name.setdefault(name, {})
        if version in versions:
            raise ConflictError(f"model {name}:{version} is already served" if version else f"{name} is already served")
        replica_policy = self.config.replica_policy(name, manifest.serving if manifest is not None else None)
        if replica_policy.process and source.model is not None:
            log.warning("a Model object runs on the server's threads: isolation: process needs a pod",
                        extra={"fields": {"model": name}})
            replica_policy = ReplicaPolicy()
        entry = ModelEntry(name, version, source, signature=signature, platform=platform, policy=policy,
                           metrics=self.metrics.for_model(name, "" if version is None else str(version)),
                           manifest=manifest, aliases=aliases, replica_policy=replica_policy)
        versions[version] = entry
        return entry

    # -- looking up -------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        """Whether a model of this name is served (no exception to build on the hot path)."""
        return bool(self._by_name.get(name))  # type: ignore[call-overload]

    def versions(self, name: str) -> dict[int | None, ModelEntry]:
        found = self._by_name.get(name)
        if not found:
            raise NotFoundError(f"unknown model {name!r}")
        return found

    def __iter__(self) -> Iterator[ModelEntry]:
        for versions in self._by_name.values():
            yield from versions.values()

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    # -- loading ----------------------------------------------------------------------------------
    async def ensure_ready(self, entry: ModelEntry) -> None:
        """Load an on-demand entry (once, however many requests ask); raise if it cannot serve."""
        if entry.state is ModelState.READY:
            return
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
        elif entry.available:
            try:
                await self.load(entry)
            except OverloadedError:
                raise
            except Exception:
                pass
        if not entry.ready:  # (a property: the awaits above changed the state)
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReadyError(f"model {entry.label} is not ready{why}")

    async def load(self, entry: ModelEntry) -> None:
        """Load (or reload) one entry. Failures leave it UNAVAILABLE with a reason, and raise."""
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
            return
        if entry.state is ModelState.READY:
            return
        loop = asyncio.get_running_loop()
        entry.loading = loop.create_future()
        entry.state = ModelState.LOADING
        try:
            async with self._load_lock:
                await self._make_room(entry, entry.estimate_bytes(), strict=True)
                started = time.perf_counter()
                if entry.replica_policy.process:
                    from modelpod.serving.replica_load import load_replicas

                    entry.model, entry.worker, entry.batcher = await load_replicas(
                        entry, self.settings, self.metrics, partial(self._replicas_failed, entry))
                    entry.load_seconds = time.perf_counter() - started
                    entry.memory_bytes = max(entry.worker.memory_bytes(), entry.manifest.weights_bytes()
                                             if entry.manifest else 0)
                else:
                    model, grown = await _without_collections(asyncio.to_thread(self._load_blocking, entry))
                    entry.load_seconds = time.perf_counter() - started
                    entry.memory_bytes = max(grown, entry.manifest.weights_bytes() if entry.manifest else 0)
                    entry.model = model
                    entry.worker = ModelWorker(model, entry.label, entry.policy.max_concurrency,
                                               self.settings.inline_max_ms / 1000.0)
                    entry.batcher = Batcher(entry.worker, entry.policy, entry.metrics, batchable=entry.batchable)
                entry.state = ModelState.READY
                entry.failed, entry.reason = False, ""
                entry.last_used = time.perf_counter()
                entry.metrics.loads["success"].inc()
                for hook in self.on_ready:
                    _quietly(hook, entry)
                log.info("model loaded", extra={"fields": {
                    "model": entry.name, "version": entry.version_text, "seconds": round(entry.load_seconds, 4),
                    "memory_bytes": entry.memory_bytes}})
                await self._make_room(entry, 0, strict=False)
        except Exception as exc:
            entry.state = ModelState.UNAVAILABLE
            entry.reason = str(exc)
            # A full memory budget is a passing condition; anything else needs an explicit reload.
            entry.failed = not isinstance(exc, OverloadedError)
            entry.metrics.loads["error"].inc()
            log.error("model load failed", extra={"fields": {
                "model": entry.name, "version": entry.version_text, "error": f"{type(exc).__name__}: {exc}"}})
            raise
        finally:
            fut, entry.loading = entry.loading, None
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _load_blocking(self, entry: ModelEntry) -> tuple[Model, int]:
        src = entry.source
        if src.model is None:
            # Import the framework first, so the RSS delta is this model's, not the library's.
            # (RUNTIME_IMPORTS: what loading needs, where it is less than the extra, e.g. no onnx for ONNX)
            adapter = require(entry.platform)
            for module in getattr(adapter, "RUNTIME_IMPORTS", getattr(adapter, "IMPORTS", ())):
                importlib.import_module(module)
        before = rss_bytes()
        if src.model is not None:
            model = src.model
        else:
            if src.path is not None:
                pod = Pod.open(src.path, verify=True)
            else:
                store = self.store(create=True)
                assert store is not None and src.ref is not None
                pod = store.open(src.ref, verify=True)
            model = load_model(pod, self.settings, policy=self.trust(), what=f"pod {entry.label}")
        if not getattr(model, "loaded", False):
            model.load()
        return model, max(0, rss_bytes() - before)

    async def unload(self, entry: ModelEntry, *, reason: str = "unloaded", on_demand: bool = False,
                     collect: bool = True) -> None:
        """Wait for the entry's requests, then unload it. ``on_demand``: reload on the next request.

        ``collect``: collect what the model left (a full collection, tenths of a second with a big
        framework loaded); a server that is stopping skips it."""
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
        if entry.state is not ModelState.READY:
            entry.on_demand = on_demand and entry.on_demand
            entry.reason = reason
            return
        entry.state = ModelState.UNLOADING
        batcher, worker, model = entry.batcher, entry.worker, entry.model
        if batcher is not None:
            await batcher.wait_idle()
            batcher.close(reason)
        if worker is not None:
            worker.close()
            if (replicas := replica_set(worker)) is not None:
                await replicas.wait_closed()
                model = None  # a stand-in: nothing to unload here
        if model is not None:
            try:
                await asyncio.to_thread(model.unload)
            except Exception as exc:  # keep the server up; the memory may not come back
                log.error("model unload failed", extra={"fields": {"model": entry.label, "error": str(exc)}})
        entry.model = entry.worker = entry.batcher = None
        del batcher, worker, model
        if collect:
            await asyncio.to_thread(_collect_thawed)
        entry.state = ModelState.UNAVAILABLE
        entry.on_demand = on_demand
        entry.reason = reason
        log.info("model unloaded", extra={"fields": {"model": entry.name, "version": entry.version_text,
                                                     "reason": reason}})

    def _replicas_failed(self, entry: ModelEntry, replicas: ReplicaSet, reason: str) -> None:
        """A model's replicas cannot start any more: it is marked failed, with the child's last lines."""
        if entry.worker is not replicas:
            return  # still loading: the load fails with the same reason
        if entry.batcher is not None:
            entry.batcher.close(f"failed: {reason}")
        replicas.close()
        entry.model = entry.worker = entry.batcher = None
        entry.state, entry.failed, entry.reason = ModelState.UNAVAILABLE, True, reason

    # -- memory budget ----------------------------------------------------------------------------
    def used_bytes(self, exclude: ModelEntry | None = None) -> int:
        return sum(e.memory_bytes for e in self if e is not exclude
                   and e.state in (ModelState.READY, ModelState.UNLOADING))

    async def _make_room(self, entry: ModelEntry, need: int, *, strict: bool) -> None:
        budget = self.settings.memory_budget_bytes
        if budget is None:
            return
        need = need or entry.memory_bytes
        while self.used_bytes(exclude=entry) + need > budget:
            idle = [e for e in self if e is not entry and e.state is ModelState.READY
                    and (e.batcher is None or e.batcher.inflight == 0)]
            if not idle:
                break
            victim = min(idle, key=lambda e: e.last_used)
            victim.metrics.evictions.inc()
            log.info("evicting model to stay within the memory budget", extra={"fields": {
                "model": victim.name, "version": victim.version_text, "memory_bytes": victim.memory_bytes,
                "for": entry.label}})
            await self.unload(victim, reason="evicted to stay within the memory budget", on_demand=True)
        used = self.used_bytes(exclude=entry)
        if used + need > budget:
            if strict and used > 0:
                raise OverloadedError(
                    f"memory budget: model {entry.label} needs ~{need} bytes, {used} of {budget} are held "
                    "by models that are busy", retry_after_s=1)
            log.warning("memory budget exceeded", extra={"fields": {
                "model": entry.label, "need_bytes": need, "used_bytes": used, "budget_bytes": budget}})

    # -- gauges for /metrics ----------------------------------------------------------------------
    def gauge(self, what: str) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for e in self:
            if what == "queue":
                value: float = e.batcher.queue_depth if e.batcher is not None else 0
            elif what == "inflight":
                value = e.batcher.inflight if e.batcher is not None else 0
            elif what == "load_seconds":
                value = e.load_seconds
            elif what == "memory":
                value = e.memory_bytes if e.ready else 0
                if e.replicas is not None:
                    value = max(e.replicas.memory_bytes(), value)
            elif what == "replicas":
                value = e.replicas.ready_count() if e.replicas is not None else (1 if e.ready else 0)
            else:
                value = 1 if e.ready else 0
            out.append((e.metrics.key, value))
        return out


async def _without_collections(load: Awaitable[T]) -> T:
    """Run a load with the cyclic collector off, then freeze what it made and turn the collector back on.

    A framework import allocates some 10^5 container objects and trips several collections, two of
    them full ones, which together cost about 10 % of a sklearn pod's cold start and find almost
    nothing (about a thousand objects of garbage, which stay frozen until the model is unloaded).
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        result = await load
        gc.freeze()  # what the load made lives as long as the model: keep it out of collections
        return result
    finally:
        if was_on:
            gc.enable()


def _collect_thawed() -> None:
    """Collect the cycles an unloaded model left among the frozen objects, then freeze the rest again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
