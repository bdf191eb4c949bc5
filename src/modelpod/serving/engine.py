"""InferenceEngine: the one protocol-neutral facade. REST, gRPC and batch jobs only translate to it.

It answers health and metadata, runs inference through the traffic split (routes), the registry and
each model's batcher, counts every answered request in the metrics, and runs the model repository
extension.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from modelpod import __version__, table
from modelpod.errors import (
    InferenceError,
    InvalidRequestError,
    ModelNotReadyError,
    ModelpodError,
    NotFoundError,
    UsageError,
)
from modelpod.inputs import InputCheck
from modelpod.model import Batch, Model, with_parameters
from modelpod.observe.context import SPAN
from modelpod.observe.hub import Observer
from modelpod.serving.batcher import Batcher
from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.messages import InferRequest, InferResult
from modelpod.serving.metrics import ServingMetrics, outcome_of
from modelpod.serving.registry import ModelEntry, ModelRegistry, ModelState
from modelpod.serving.traffic import TrafficSplit, Variant
from modelpod.settings import Settings
from modelpod.store import Ref, directory_hint, is_path

log = logging.getLogger("modelpod.serving")

EXTENSIONS = ("binary_tensor_data", "model_repository", "model_configuration", "parameters")
_TRITON_TYPES = {"BYTES": "TYPE_STRING"}
_READY = ModelState.READY  # an Enum class attribute costs a __getattr__ hook call on 3.11: read it once


def _header_id(headers: Mapping[str, str] | None) -> str | None:
    """A routed request without an id takes its ``x-request-id`` (if sane) before one is made up."""
    value = headers.get("x-request-id") if headers is not None else None
    return value if value and len(value) <= 256 and value.isprintable() else None


class InferenceEngine:
    def __init__(self, settings: Settings | None = None, config: ServeConfig | None = None) -> None:
        self.settings = settings or Settings()
        self.config = config or ServeConfig.from_settings(self.settings)
        self.metrics = ServingMetrics(
            queue_depth=lambda: self.registry.gauge("queue"),
            inflight=lambda: self.registry.gauge("inflight"),
            load_seconds=lambda: self.registry.gauge("load_seconds"),
            memory_bytes=lambda: self.registry.gauge("memory"),
            ready=lambda: self.registry.gauge("ready"),
            replicas=lambda: self.registry.gauge("replicas"),
        )
        self.registry = ModelRegistry(self.settings, self.config, self.metrics)
        self.traffic = TrafficSplit(self.registry, self.metrics)
        self.resolver = self.traffic.resolver
        # Optional console sections (drift, replicas, ...): name -> a callable returning one table,
        # {"title", "columns", "rows"[, "note"]} (modelpod.console.views). The console shows each one set
        # here: "drift" (observe/) once a model has a drift reference, "replicas" once one runs in replicas.
        self.console_sections: dict[str, Callable[[], Mapping[str, Any]]] = {}
        self.observe = Observer(self.metrics, self.registry, self.config.payload_logs, self._entries_of,
                                self.config.drift, self.console_sections)
        self.registry.on_ready.append(self._replicas_section)
        self._routes_configured = False
        self.started = False
        self.draining = False

    def _replicas_section(self, entry: ModelEntry) -> None:
        if entry.replicas is not None:
            from modelpod.serving.replicas import console_table

            self.console_sections.setdefault("replicas", lambda: console_table(
                [rs for e in self.registry if (rs := e.replicas) is not None]))

    # -- registering ------------------------------------------------------------------------------
    def add(self, ref: str) -> ModelEntry:
        """Serve a store reference, or a pod directory written as a path (``./lr``, ``/abs/lr``);
        loaded by ``start`` unless lazy."""
        if is_path(ref):
            return self.registry.add_path(Path(ref).expanduser())
        try:
            return self.registry.add_ref(ref)
        except NotFoundError as exc:
            raise NotFoundError(f"{exc}{directory_hint(ref)}") from None

    def add_model(self, model: Model, name: str | None = None, version: int | None = None,
                  policy: BatchPolicy | None = None) -> ModelEntry:
        """Serve a ready ``Model`` object."""
        return self.registry.add_model(model, name, version, policy)

    def configure_routes(self) -> None:
        """Register the config file's routes and the models they name (checked all at once)."""
        if not self._routes_configured:
            self.traffic.configure(self.config.routes)
            self._routes_configured = True

    async def start(self) -> None:
        """Load every registered model (unless lazy); a failed load leaves only that model unready."""
        self.configure_routes()
        if not self.settings.lazy_load:
            for entry in list(self.registry):
                if entry.state is ModelState.UNAVAILABLE and entry.available:
                    try:
                        await self.registry.load(entry)
                    except Exception:
                        self.traffic.load_failed(entry)
                        continue
        self.started = True

    # -- health and metadata ----------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Started, not draining, no model stuck after a failed load, and every route able to serve."""
        return (self.started and not self.draining and not any(e.failed for e in self.registry)
                and self.traffic.serving())

    def metadata(self) -> dict[str, Any]:
        return {"name": "modelpod", "version": __version__, "extensions": list(EXTENSIONS)}

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        return self.traffic.resolve(name, version)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        entry = self.resolve(name, version)
        if self.draining or not self.started:
            return False
        # A lazily loaded or evicted model counts as ready: its next request loads it.
        return entry.available

    def unready_reason(self, name: str, version: str | None = None) -> str:
        """Why a model is not ready ("" when it is, or when it just is not loaded yet): a failed load's
        error, e.g. the last lines a replica process wrote before it died."""
        entry = self.resolve(name, version)
        if self.draining:
            return "the server is shutting down"
        return entry.reason if entry.failed else ""

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry = self.resolve(name, version)
        versions = sorted(
            e.version for e in self.registry.versions(entry.name).values() if e.version is not None)
        sig = entry.signature
        meta: dict[str, Any] = {
            "name": entry.name,
            "versions": [str(v) for v in versions] or ([entry.version_text] if entry.version_text else []),
            "platform": entry.platform,
            "inputs": [t.to_dict() for t in sig.inputs],
            "outputs": [t.to_dict() for t in sig.outputs],
        }
        if sig.parameters:  # a table's content_type and dtypes, a classifier's class_labels
            meta["parameters"] = dict(sig.parameters)
        if entry.failed:  # beyond OIP's fields (clients ignore them): why the model does not serve
            meta["state"], meta["reason"] = entry.state.value, entry.reason
        if entry.replica_policy.process:
            meta["isolation"] = "process"
            meta["replicas"] = entry.replicas.describe() if entry.replicas is not None else []
        return meta

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration (what perf_analyzer reads): batch size and tensor dims."""
        entry = self.resolve(name, version)
        sig = entry.signature
        # Triton's dims leave out the batch dimension when max_batch_size > 0.
        batched = (entry.batchable and bool(sig.inputs) and entry.policy.max_batch_rows > 1
                   and all(len(t.shape) >= 1 and t.shape[0] == -1 for t in sig.outputs))

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": _TRITON_TYPES.get(t.datatype, f"TYPE_{t.datatype}"),
                     "dims": list(t.shape[1:] if batched else t.shape)} for t in specs]

        config: dict[str, Any] = {
            "name": entry.name,
            "platform": f"modelpod_{entry.platform}",
            "backend": "modelpod",
            "version_policy": {"specific": {"versions": [entry.version]}} if entry.version else {"latest": {}},
            "max_batch_size": entry.policy.max_batch_rows if batched else 0,
            "input": tensors(sig.inputs),
            "output": tensors(sig.outputs),
        }
        if config["max_batch_size"]:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(entry.policy.max_batch_wait_ms * 1000)}
        return config

    # -- inference --------------------------------------------------------------------------------
    async def infer(self, name: str, version: str | None, request: InferRequest, *, protocol: str = "rest",
                    started: float | None = None, headers: Mapping[str, str] | None = None,
                    resolved: ModelEntry | None = None) -> InferResult:
        """Run one request; every answered request (ok or not) is counted under its model (and, when a
        route chose the model, under the route and variant). ``headers``: where sticky keys are read.
        ``resolved``: the entry ``name`` and ``version`` resolved to just before, with nothing awaited
        since (the caller's input check), so it is not looked up twice; a route still picks its variant."""
        t0 = started if started is not None else time.perf_counter()
        entry: ModelEntry | None = None
        variant = None
        try:
            entry, variant = self._choose(name, version, headers, resolved)
            if entry.state is not _READY:
                if entry.state is ModelState.UNLOADING:
                    raise ModelNotReadyError(f"model {entry.label} is being unloaded")
                await self.registry.ensure_ready(entry)
            batcher, inputs, model_inputs = self._prepare(entry, request, t0)
            # The request's server span, if it has one and it records (observe.span(), inlined: per request).
            span = SPAN.get() if self.observe.tracing is not None else None
            if span is not None and span.is_recording():
                span.set_attributes({"modelpod.model": entry.name, "modelpod.version": entry.version_text,
                                     "modelpod.variant": entry.label})
                outputs = await batcher.submit(inputs, (span, time.time_ns()))
            else:
                outputs = await batcher.submit(inputs)
        except Exception as exc:
            self._raise_failed(name, entry, variant, protocol, t0, exc)
        return self._answered(entry, variant, protocol, t0, request, headers, model_inputs, outputs)

    def submit(self, name: str, version: str | None, request: InferRequest,
               done: Callable[[InferResult | None, BaseException | None], None], *, protocol: str = "rest",
               started: float | None = None, headers: Mapping[str, str] | None = None,
               resolved: ModelEntry | None = None) -> bool:
        """``infer`` without a coroutine, for a model that is ready when no span records: True when the
        request is queued, and ``done(result, None)`` or ``done(None, error)`` is then called once, on
        the loop, after this returns; an error found before it is queued is raised (and counted).
        False, with nothing done or counted, when the request must go through ``infer``."""
        if self.observe.tracing is not None:
            return False
        t0 = started if started is not None else time.perf_counter()
        try:
            chosen, variant = self._choose(name, version, headers, resolved)
        except Exception as exc:
            self._raise_failed(name, None, None, protocol, t0, exc)
        if chosen.state is not _READY:
            return False  # infer loads it, or says why not
        try:
            batcher, inputs, model_inputs = self._prepare(chosen, request, t0)

            def finished(outputs: Batch | None, error: BaseException | None) -> None:
                if error is None and outputs is not None:
                    try:
                        result = self._answered(chosen, variant, protocol, t0, request, headers, model_inputs, outputs)
                    except Exception as exc:  # (counting or encoding failed) answered as an error, never lost
                        error = exc
                    else:
                        done(result, None)
                        return
                fault = self._failed(name, chosen, variant, protocol, t0, error or InferenceError("no outputs"))
                if fault is not error:
                    fault.__cause__ = error
                done(None, fault)

            batcher.enqueue(inputs, finished)
        except Exception as exc:
            self._raise_failed(name, chosen, variant, protocol, t0, exc)
        return True

    def _choose(self, name: str, version: str | None, headers: Mapping[str, str] | None,
                resolved: ModelEntry | None) -> tuple[ModelEntry, Variant | None]:
        """The entry a request goes to, and the route's variant when a route chose it."""
        if self.draining:
            raise ModelNotReadyError("the server is shutting down")
        variant = self.traffic.pick(name, version, headers) if self.traffic.routes else None
        if variant is not None:
            return variant.entry, variant
        return (resolved if resolved is not None else self.traffic.resolve(name, version)), None

    def _prepare(self, entry: ModelEntry, request: InferRequest, t0: float) -> tuple[Batcher, Batch, Batch]:
        """The ready entry's batcher, the model's inputs (with parameters) and the inputs as checked."""
        model, batcher = entry.model, entry.batcher
        if model is None or batcher is None:
            raise ModelNotReadyError(f"model {entry.label} is not ready")
        inputs = request.inputs
        checked = request.checked
        # A table's records input (decoded as one BYTES input) becomes its columns in arrays().
        if checked is None or entry.signature.is_table or (
                checked is not entry.signature and checked != entry.signature):
            inputs = self.input_check(entry).arrays(inputs)
        if request.outputs:
            self._check_outputs(entry, request.outputs)
        entry.last_used = t0
        model_inputs = inputs
        if model.takes_parameters:
            inputs = with_parameters(inputs, request.parameters, model.row_parameters)
        return batcher, inputs, model_inputs

    def _failed(self, name: str, entry: ModelEntry | None, variant: Variant | None, protocol: str, t0: float,
                exc: BaseException) -> ModelpodError:
        """Count a failed request; the error to answer (anything but a ModelpodError becomes an InferenceError)."""
        self.observe.failed(name, entry, exc)
        if isinstance(exc, ModelpodError):
            fault, outcome = exc, outcome_of(exc)
        else:
            fault = InferenceError(f"inference failed in model {name!r}", detail=f"{type(exc).__name__}: {exc}")
            outcome = "error"
        if variant is not None:
            self.traffic.failed(variant, protocol, outcome, time.perf_counter() - t0)
        elif entry is not None:
            entry.metrics.observe_request(protocol, outcome, time.perf_counter() - t0)
        return fault

    def _raise_failed(self, name: str, entry: ModelEntry | None, variant: Variant | None, protocol: str,
                      t0: float, exc: Exception) -> NoReturn:
        """Count a failed request and raise what to answer (``exc`` itself when a ModelpodError)."""
        fault = self._failed(name, entry, variant, protocol, t0, exc)
        if fault is exc:
            raise exc
        raise fault from exc

    def _answered(self, entry: ModelEntry, variant: Variant | None, protocol: str, t0: float, request: InferRequest,
                  headers: Mapping[str, str] | None, model_inputs: Batch, outputs: Batch) -> InferResult:
        """Count an answered request (and, for a route, keep it for feedback and send its shadows)."""
        observe = self.observe
        if variant is not None:
            rid = request.id
            if rid is None and headers is not None and "x-request-id" in headers:
                rid = _header_id(headers)
            rid = self.traffic.answered(variant, protocol, t0, rid, request.inputs, outputs)
            # The payload sample is drawn before the record's fields are read (most are not chosen).
            sink = observe.payload.pick(entry.name) if observe.payload is not None else None
            if sink is not None:
                observe.answered(entry, variant.name, variant.route, rid, model_inputs, outputs, sink)
            return InferResult(entry.name, entry.version_text or None, outputs, rid, variant.route, variant.name)
        entry.metrics.observe_request(protocol, "success", time.perf_counter() - t0)
        sink = observe.payload.pick(entry.name) if observe.payload is not None else None
        if sink is not None:
            observe.answered(entry, entry.label, "", request.id or _header_id(headers), model_inputs, outputs, sink)
        return InferResult(entry.name, entry.version_text or None, outputs, request.id, None, entry.label)

    def input_check(self, entry: ModelEntry | str, version: str | None = None) -> InputCheck:
        """The input check of a model (an entry, or a name and version to resolve)."""
        if isinstance(entry, str):
            entry = self.traffic.resolve(entry, version)  # a route name resolves to one of its variants
        check = entry.input_check
        if check is None or check.signature is not entry.signature:
            check = entry.input_check = table.input_check(entry.signature, entry.label,
                                                          self.config.nonfinite(entry.name))
        return check

    def _entries_of(self, name: str, version: str | None) -> list[ModelEntry]:
        """The entries ``name`` stands for: a route's variants and shadows, or a model's versions."""
        route = self.traffic.routes.get(name)
        if route is not None and version is None:
            return [v.entry for v in (*route.variants, *route.shadows)]
        if version is not None:
            return [self.resolve(name, version)]
        return list(self.registry.versions(name).values())

    async def drift(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Per-feature drift of the versions ``name`` stands for (``GET /v2/models/{name}/drift``), once
        the batches already answered are binned (waiting at most a second, off the loop)."""
        self.observe.entries_of(name, version)  # 404 before any wait
        await asyncio.to_thread(self.observe.drift.drain, 1.0)
        return self.observe.drift_table(name, version)

    @staticmethod
    def _check_outputs(entry: ModelEntry, wanted: Mapping[str, bool]) -> None:
        known = {t.name for t in entry.signature.outputs}
        if known:
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise InvalidRequestError(
                    f"model {entry.label} has no output(s) {', '.join(unknown)}; outputs: {', '.join(sorted(known))}")

    # -- repository extension ---------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every served model version, plus the store's other pods as UNAVAILABLE."""
        rows: list[dict[str, Any]] = []
        served: set[tuple[str, int | None]] = set()
        for e in self.registry:
            served.add((e.name, e.version))
            row = {"name": e.name, "version": e.version_text, "state": e.state.value}
            if e.reason:
                row["reason"] = e.reason
            rows.append(row)
        store = self.registry.store()
        if store is not None:
            for rec in store.list():
                if (rec.name, rec.version) not in served:
                    rows.append({"name": rec.name, "version": str(rec.version), "state": "UNAVAILABLE",
                                 "reason": "in the store, not loaded"})
        if ready_only:
            rows = [r for r in rows if r["state"] == ModelState.READY.value]
        return sorted(rows, key=lambda r: (r["name"], r["version"]))

    async def load_model(self, ref: str) -> ModelEntry:
        """Load a model by store name (NAME, NAME:V, NAME@ALIAS); never a path or URL."""
        try:
            parsed = Ref.parse(ref)
        except UsageError:
            raise InvalidRequestError(f"bad model reference {ref!r}: use NAME, NAME:VERSION or NAME@ALIAS") from None
        if not parsed.name:
            raise InvalidRequestError("load a model by name, not by digest")
        entry = self._served(parsed)
        if entry is None:
            store = self.registry.store()
            if store is None:
                raise NotFoundError(f"no model {ref!r} here and no store to load it from")
            entry = self.registry.add_ref(ref)
        entry.on_demand, entry.failed = True, False
        if entry.state is not ModelState.READY:
            await self.registry.load(entry)
        return entry

    def _served(self, ref: Ref) -> ModelEntry | None:
        return self.resolver.served(ref)

    async def unload_model(self, name: str, version: str | None = None) -> list[ModelEntry]:
        """Unload every version of ``name`` (or only ``version``); it stays listed, UNAVAILABLE, until
        loaded again. Refused while a route would be left with no variant to serve."""
        entries = [self.resolver.resolve(name, version)] if version else list(self.registry.versions(name).values())
        self.traffic.check_unload(entries)
        await asyncio.gather(*(self.registry.unload(e, reason="unloaded") for e in entries))
        return entries

    # -- shutdown ---------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Readiness turns false and new requests are refused; running ones carry on."""
        self.draining = True

    def inflight(self) -> int:
        return sum(e.batcher.inflight for e in self.registry if e.batcher is not None)

    async def wait_idle(self) -> None:
        await asyncio.gather(*(e.batcher.wait_idle() for e in self.registry if e.batcher is not None))

    async def close(self, *, collect: bool = True) -> None:
        """Unload every model (after their requests). ``collect=False``: leave what the models left
        to the process's exit instead of a full collection per model."""
        self.traffic.close()
        for entry in list(self.registry):
            await self.registry.unload(entry, reason="server stopped", collect=collect)
        await asyncio.to_thread(self.observe.close)
