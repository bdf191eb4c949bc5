"""Routing a public model name to the version that serves it: the one place that choice is made.

Without a route: an explicit version (``2``) or alias (``production``) picks that version; no version
picks the highest version that can serve. A **route** (``routes:`` in ``--config``, or ``PUT
/v2/routes/{name}``) is a public name served by weighted variants: each request without a version
gets one variant, by weight (random per request), or by weighted rendezvous hashing of its sticky
key, so a weight change moves only the keys that must move. Shadows get a copy of each answered
request after the answer (``serving/shadow.py``); feedback joins outcomes to the variant that answered
(``serving/feedback.py``); rollouts move weights step by step (``serving/rollout.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from typing import Any

from modelpod.errors import ConflictError, ModelNotReadyError, NotFoundError, UsageError
from modelpod.model import Batch
from modelpod.serving import feedback
from modelpod.serving.feedback import Answers
from modelpod.serving.metrics import ModelMetrics, ServingMetrics
from modelpod.serving.registry import ModelEntry, ModelRegistry, ModelState
from modelpod.serving.routes import RouteSpec
from modelpod.serving.shadow import ShadowSender
from modelpod.serving.stats import LATENCY_WINDOW, VariantStats
from modelpod.store import Ref

log = logging.getLogger("modelpod.serving")
_SCALE = 2.0**64
_READY = ModelState.READY  # an Enum class attribute costs a __getattr__ hook call on 3.11: read it once


class VersionResolver:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for ``name`` and an optional version: an integer, an alias, or empty."""
        versions = self.registry.versions(name)
        if not version:
            return self.default(name)
        if version.isascii() and version.isdigit():  # "²".isdigit() is true and int("١") is 1
            entry = versions.get(int(version))
            if entry is not None:
                return entry
        else:
            for entry in versions.values():
                if version in entry.aliases:
                    return entry
        raise NotFoundError(f"model {name!r} has no version {version!r}")

    def default(self, name: str) -> ModelEntry:
        versions = self.registry.versions(name)
        if len(versions) == 1:
            return next(iter(versions.values()))
        entries = sorted(versions.values(), key=lambda e: -1 if e.version is None else e.version)
        serving = [e for e in entries if e.available]
        return (serving or entries)[-1]

    def served(self, ref: Ref) -> ModelEntry | None:
        """The served entry a parsed reference names, if any."""
        try:
            versions = self.registry.versions(ref.name)
        except NotFoundError:
            return None
        if ref.digest is not None:  # exactly that content, or nothing (the store may hold it)
            return next((e for e in versions.values() if e.manifest is not None
                         and e.manifest.digest == ref.digest), None)
        if ref.version is not None:
            return versions.get(ref.version)
        if ref.alias is not None:
            return next((e for e in versions.values() if ref.alias in e.aliases), None)
        return self.default(ref.name)


def set_aside(entry: ModelEntry) -> None:
    """A model a route asked for failed to load: not served (its reason kept), without turning the
    whole server unready as a failed model given at start does; the next change tries it again."""
    entry.failed, entry.on_demand = False, False


class Variant:
    """One model version inside a route (a variant or a shadow)."""

    __slots__ = ("entry", "metrics", "name", "owner", "route", "stats", "weight")

    def __init__(self, owner: Route, entry: ModelEntry, weight: float, stats: VariantStats,
                 metrics: ModelMetrics) -> None:
        self.owner = owner
        self.route = owner.spec.name
        self.entry = entry
        self.name = entry.label
        self.weight = weight
        self.stats = stats
        self.metrics = metrics

    @property
    def status(self) -> str:
        e = self.entry
        if e.ready or e.available:
            return e.state.value
        return f"{e.state.value}: {e.reason}" if e.reason else e.state.value


def _score(key: str, name: str, weight: float) -> float:
    """Weighted rendezvous hashing: the variant with the highest score takes the key.

    ``-w / ln(u)`` with ``u`` uniform per (key, variant) picks each variant with probability
    proportional to its weight, and changing one weight moves keys only to or from that variant."""
    if weight <= 0:
        return 0.0
    digest = hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _SCALE
    return -weight / math.log(u)


class Route:
    """A route's live state: its variants and shadows, their stats, the ids of recent answers."""

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec
        self.variants: tuple[Variant, ...] = ()
        self.shadows: tuple[Variant, ...] = ()
        self.weights: tuple[float, ...] = ()  # in force: configured, or the bandit's
        self.weighted: tuple[Variant, ...] = ()  # the variants with a weight above 0, in order
        self.only: Variant | None = None  # the one variant with a weight, when there is only one
        self._cum: list[float] = []
        self._total = 0.0
        self.baseline = ""
        self.stats: dict[str, VariantStats] = {}
        self.metrics: dict[str, ModelMetrics] = {}
        self.ids = Answers()
        self.shadow_inflight: dict[str, int] = {}
        self.pmin: dict[tuple[str, str, str], float] = {}  # (baseline, variant, metric) -> running min
        self.history: list[tuple[RouteSpec, dict[str, int]]] = []  # earlier completed states, alias targets
        self.completed = spec  # the last completed state: what a rollback during a rollout returns to
        self.rollout: Any = None  # serving.rollout.Rollout while one runs (or the last one)
        self.events: list[dict[str, Any]] = []  # rollbacks and their reasons, newest last
        self.unit_rewards = True  # every reward so far in [0, 1]: the bandit uses Beta posteriors
        self.bandit_at = 0.0

    def set_weights(self, weights: Iterable[float]) -> None:
        """Put new weights in force (one assignment each: a request sees the old or the new set)."""
        ws = tuple(float(w) for w in weights)
        cum, total = [], 0.0
        for w in ws:
            total += w
            cum.append(total)
        weighted = tuple(v for v, w in zip(self.variants, ws, strict=True) if w > 0)
        self.weights, self._cum, self._total = ws, cum, total
        self.weighted, self.only = weighted, weighted[0] if len(weighted) == 1 else None

    def pick(self, headers: Mapping[str, str] | None) -> Variant:
        chosen = self.only  # one variant with a weight takes every request, sticky or not
        if chosen is not None:
            entry = chosen.entry
            if entry.state is _READY or entry.available:
                return chosen
            return self._pick_live(None)
        sticky = self.spec.sticky
        key = headers.get(sticky) if sticky is not None and headers is not None else None
        variants = self.variants
        if key:
            chosen = max(zip(variants, self.weights, strict=True), key=lambda vw: _score(key, vw[0].name, vw[1]))[0]
        else:
            i = bisect_right(self._cum, random.random() * self._total)
            chosen = variants[i] if i < len(variants) else variants[-1]
        entry = chosen.entry
        if entry.state is _READY or entry.available:
            return chosen
        return self._pick_live(key)

    def _pick_live(self, key: str | None) -> Variant:
        """A variant is down (unloaded, failed): choose among the ones that can serve."""
        live = [(v, w) for v, w in zip(self.variants, self.weights, strict=True) if w > 0 and v.entry.available]
        if not live:
            why = "; ".join(f"{v.name}: {v.status}" for v in self.variants)
            raise ModelNotReadyError(f"route {self.spec.name}: no variant can serve ({why})")
        if key:
            return max(live, key=lambda vw: _score(key, vw[0].name, vw[1]))[0]
        r = random.random() * sum(w for _, w in live)
        for v, w in live:
            r -= w
            if r < 0:
                return v
        return live[-1][0]

    def by_version(self, version: str) -> ModelEntry:
        for v in self.variants:
            e = v.entry
            if version == e.version_text or version in e.aliases:
                return e
        raise NotFoundError(f"route {self.spec.name!r} has no variant with version {version!r}")

    def variant(self, name: str) -> Variant | None:
        return next((v for v in (*self.variants, *self.shadows) if v.name == name), None)

    @property
    def status(self) -> str:
        down = [v for v in self.variants if not v.entry.available]
        if not down:
            return "serving"
        if len(down) == len(self.variants) or all(w == 0 for v, w in zip(self.variants, self.weights, strict=True)
                                                  if v.entry.available):
            return "down: " + "; ".join(f"{v.name} {v.status}" for v in down)
        return "degraded, serving on the others: " + "; ".join(f"{v.name} {v.status}" for v in down)

    def describe(self) -> dict[str, Any]:
        total = self._total or 1.0
        out: dict[str, Any] = {
            "name": self.spec.name, **self.spec.to_dict(), "status": self.status, "baseline": self.baseline,
            "weights": {v.name: round(w, 6) for v, w in zip(self.variants, self.weights, strict=True)},
            "share": {v.name: round(w / total, 6) for v, w in zip(self.variants, self.weights, strict=True)},
            "models": {v.name: v.status for v in (*self.variants, *self.shadows)},
            "rollbacks_available": len(self.history) + (1 if self.rollout_running else 0),
        }
        if self.rollout is not None:
            out["rollout"] = self.rollout.describe()
        if self.events:
            out["events"] = self.events[-10:]
        return out

    @property
    def rollout_running(self) -> bool:
        return self.rollout is not None and self.rollout.running


class TrafficSplit:
    """Every route of a server; the engine asks it which entry answers a request."""

    def __init__(self, registry: ModelRegistry, metrics: ServingMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.resolver = VersionResolver(registry)
        self.routes: dict[str, Route] = {}
        self.shadows = ShadowSender(registry)
        self._registered: set[int] = set()  # entries served only because a route names them
        for family in feedback.route_metrics(self):
            self.metrics.registry.add(family)

    # -- the hot path -----------------------------------------------------------------------------
    def pick(self, name: str, version: str | None, headers: Mapping[str, str] | None) -> Variant | None:
        """The variant answering a request for ``name``, or None when no route splits it."""
        route = self.routes.get(name)
        if route is None or version:
            return None
        return route.pick(headers)

    def failed(self, variant: Variant, protocol: str, outcome: str, seconds: float) -> None:
        variant.metrics.observe_request(protocol, outcome, seconds)
        if outcome != "client_error":  # bad input says nothing about the variant
            variant.stats.observe(False, seconds)

    def answered(self, variant: Variant, protocol: str, started: float, request_id: str | None, inputs: Batch,
                 outputs: Batch) -> str:
        """Count a routed answer (``started``: its ``perf_counter`` at arrival), keep it for feedback,
        send the shadow copies; returns its id (made up when ``request_id`` is None)."""
        now = time.perf_counter()
        seconds = now - started
        variant.metrics.observe_request(protocol, "success", seconds)
        stats = variant.stats  # VariantStats.observe(True, seconds), inlined: this runs per answer
        stats.lat[stats.pos % LATENCY_WINDOW] = seconds
        stats.pos += 1
        route = variant.owner
        rid = route.ids.keep(request_id, variant.name, outputs, now)
        if route.shadows:
            self.shadows.send(route, variant, inputs, outputs)
        return rid

    def feedback(self, name: str, body: Any) -> dict[str, Any]:
        route = self.routes.get(name)
        if route is None:
            raise NotFoundError(f"{name!r} is not a route: feedback joins the answers of a route's variants")
        now = time.perf_counter()  # the clock answers are kept by
        out = feedback.feedback(route, body, now)
        feedback.refresh_bandit(route, now=now)
        return out

    def report(self, name: str) -> dict[str, Any]:
        return feedback.report(self.get(name))

    def describe(self, name: str) -> dict[str, Any]:
        route = self.get(name)
        feedback.refresh_bandit(route, force=True)
        return route.describe()

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        """A model's entry; a route's name that is no model resolves to its variants."""
        route = self.routes.get(name)
        if route is not None and name not in self.registry:
            if version:
                return route.by_version(version)
            weighted = route.weighted
            if weighted and weighted[0].entry.state is _READY:
                return weighted[0].entry
            for v in weighted:
                if v.entry.available:
                    return v.entry
            return route.variants[0].entry
        return self.resolver.resolve(name, version)

    def _is_model(self, name: str) -> bool:
        return name in self.registry

    # -- checking and applying specs ------------------------------------------------------------
    def check(self, spec: RouteSpec, others: Mapping[str, RouteSpec]) -> dict[str, ModelEntry | None]:
        """Refuse a spec that cannot work (nothing changes); the served entry (or None) per model ref.
        ``others``: every route by name, as it will be (this one's name is skipped)."""
        name, where = spec.name, f"route {spec.name}"
        # A route named like the model whose versions it splits is that model too; other routes are not.
        plain = {n for n, o in others.items() if n != name
                 and not any(Ref.parse(v.model).name == n for v in o.variants)}
        found: dict[str, ModelEntry | None] = {}
        for ref_text in spec.models():
            ref = Ref.parse(ref_text)
            if ref.name in plain:
                raise UsageError(f"{where}: {ref_text} names the route {ref.name}; a route's variants are models")
            entry = self.resolver.served(ref)
            if entry is None:
                store = self.registry.store()
                try:
                    if store is None:
                        raise NotFoundError(ref_text)
                    store.get(ref)
                except NotFoundError:
                    raise UsageError(
                        f"{where}: unknown model {ref_text}: not served here and not in the store") from None
            found[ref_text] = entry
        if self._is_model(name) and not any(Ref.parse(v.model).name == name for v in spec.variants):
            raise UsageError(f"{where} is named like the served model {name} but splits none of its versions; "
                             "give the route another name")
        splits_itself = any(Ref.parse(v.model).name == name for v in spec.variants)
        for other, o in others.items() if not splits_itself else ():
            if other != name and any(Ref.parse(m).name == name for m in o.models()):
                raise UsageError(f"{where}: route {other} already names {name} as a model; routes cannot nest")
        seen: dict[int, str] = {}
        for ref_text, entry in found.items():
            if entry is not None:
                if id(entry) in seen:
                    raise UsageError(f"{where}: {seen[id(entry)]} and {ref_text} are the same model version")
                seen[id(entry)] = ref_text
        return found

    def specs_with(self, spec: RouteSpec) -> dict[str, RouteSpec]:
        return {**{n: r.spec for n, r in self.routes.items()}, spec.name: spec}

    def register(self, spec: RouteSpec, found: Mapping[str, ModelEntry | None]) -> dict[str, ModelEntry]:
        """Register what is not served yet (from the store; not loaded here)."""
        out: dict[str, ModelEntry] = {}
        for ref, entry in found.items():
            # (another route of the same config file may have registered it since the check)
            served = entry or self.resolver.served(Ref.parse(ref))
            if served is None:
                served = self.registry.add_ref(ref)
                self._registered.add(id(served))
            out[ref] = served
        return out

    def load_failed(self, entry: ModelEntry) -> None:
        """A model failed to load at start: one a route alone asked for is set aside (the route serves
        on its other variants) instead of holding the whole server unready."""
        if id(entry) in self._registered:
            set_aside(entry)

    def serving(self) -> bool:
        """Every route has a variant with weight that can serve."""
        return all(any(w > 0 and v.entry.available for v, w in zip(r.variants, r.weights, strict=True))
                   for r in self.routes.values())

    def configure(self, specs: Mapping[str, RouteSpec]) -> None:
        """The config file's routes, at start (before the models load): all are checked first."""
        every = {**{n: r.spec for n, r in self.routes.items()}, **specs}
        checked = [(spec, self.check(spec, every)) for spec in specs.values()]
        for spec, found in checked:
            self.install(spec, self.register(spec, found))

    async def apply(self, spec: RouteSpec) -> Route:
        """Create or replace a route live: load what is not loaded, then give it traffic."""
        current = self.routes.get(spec.name)
        if current is not None and current.rollout_running:
            raise ConflictError(f"route {spec.name}: a rollout is running; roll it back first")
        entries = self.register(spec, self.check(spec, self.specs_with(spec)))
        await self.load_all(spec, entries)
        if not any(entries[v.model].ready for v in spec.variants if v.weight > 0):
            why = "; ".join(f"{v.model}: {entries[v.model].reason or entries[v.model].state.value}"
                            for v in spec.variants)
            raise ModelNotReadyError(f"route {spec.name}: no variant with a weight could load ({why}); "
                                     "the route is unchanged")
        route = self.install(spec, entries)
        log.info("route set", extra={"fields": {"route": spec.name, "weights": route.describe()["weights"]}})
        return route

    async def load_all(self, spec: RouteSpec, entries: Mapping[str, ModelEntry]) -> None:
        """Load what a spec names and is not loaded; a failure is logged and kept as the model's reason."""
        for entry in entries.values():
            if entry.state is not ModelState.READY and not entry.failed:
                entry.on_demand = True
                try:
                    await self.registry.load(entry)
                except Exception as exc:  # the route serves on the others; its status says why
                    set_aside(entry)
                    log.warning("route variant did not load", extra={"fields": {
                        "route": spec.name, "model": entry.label, "error": str(exc)}})

    def install(self, spec: RouteSpec, entries: Mapping[str, ModelEntry], *, completed: bool = True) -> Route:
        route = self.routes.get(spec.name)
        if route is None:
            route = Route(spec)
        elif completed and spec != route.completed:
            route.history.append((route.completed, self._aliases(route)))
            del route.history[:-20]

        def variant(ref: str, weight: float) -> Variant:
            entry = entries[ref]
            name = entry.label
            stats = route.stats.setdefault(name, VariantStats())
            metrics = route.metrics.get(name)
            if metrics is None:
                metrics = route.metrics[name] = self.metrics.for_model(entry.name, entry.version_text, spec.name, name)
            return Variant(route, entry, weight, stats, metrics)

        variants = tuple(variant(v.model, v.weight) for v in spec.variants)
        shadows = tuple(variant(s, 0.0) for s in spec.shadow)
        baseline = entries[spec.baseline].label if spec.baseline else max(variants, key=lambda v: v.weight).name
        if route.baseline != baseline:
            route.pmin.clear()
        route.spec, route.variants, route.shadows, route.baseline = spec, variants, shadows, baseline
        route.set_weights(v.weight for v in variants)
        if completed:
            route.completed = spec
        self.routes[spec.name] = route
        return route

    def reweigh(self, route: Route, weights: Mapping[str, float], entries: Mapping[str, ModelEntry],
                baseline: str | None, *, completed: bool = False) -> None:
        """New weights (and variants, by model ref) for a route, e.g. a rollout's step."""
        self.install(route.spec.with_weights(weights, baseline), entries, completed=completed)

    async def delete(self, name: str) -> None:
        route = self.get(name)
        if route.rollout is not None:
            route.rollout.cancel("the route was deleted")
        del self.routes[name]
        log.info("route deleted", extra={"fields": {"route": name}})

    async def start_rollout(self, name: str, body: Any) -> Route:
        """Start a progressive rollout of ``body["to"]`` on route ``name`` (loaded first, if need be)."""
        from modelpod.serving import rollout

        return await rollout.start(self, name, body)

    async def rollback(self, name: str) -> Route:
        """Back to the last completed state (see ``serving/rollout.py``)."""
        from modelpod.serving import rollout

        return await rollout.rollback(self, name)

    def check_unload(self, entries: Iterable[ModelEntry]) -> None:
        """Refuse to unload the last variants with traffic of a route (its requests would fail)."""
        gone = {id(e) for e in entries}
        for route in self.routes.values():
            live = [v for v, w in zip(route.variants, route.weights, strict=True) if w > 0 and v.entry.available]
            if live and all(id(v.entry) in gone for v in live):
                raise ConflictError(f"route {route.spec.name} would have no variant left to serve; "
                                    "change or delete the route first")

    def get(self, name: str) -> Route:
        route = self.routes.get(name)
        if route is None:
            raise NotFoundError(f"no route {name!r}" + (f"; routes: {', '.join(sorted(self.routes))}"
                                                        if self.routes else "; no routes are set"))
        return route

    def _aliases(self, route: Route) -> dict[str, int]:
        """Where the aliases of the route's models point now (so a rollback can put them back)."""
        out: dict[str, int] = {}
        for v in route.variants:
            for e in self.registry.versions(v.entry.name).values():
                for alias in e.aliases:
                    if e.version is not None:
                        out[f"{e.name}@{alias}"] = e.version
        return out

    def close(self) -> None:
        for route in self.routes.values():
            if route.rollout is not None and route.rollout.running:
                route.rollout.cancel("the server stopped")
