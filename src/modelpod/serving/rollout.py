"""Progressive rollouts: move a route's weight to a candidate step by step, judged on its own metrics.

At every step the candidate gets ``pct`` % and the other variants share the rest as before. The
step lasts at least ``every_s`` and until the candidate has answered ``min_requests`` in it; all
along, once it has that many, the step's error rate and p95 latency (and, with enough feedback on
both sides, the reward difference to the baseline since the rollout began) are checked against the
limits. A breach sets the candidate to 0 % at once (it stays in the route at 0 %, so the report
still shows its numbers), puts the rest back as it was before the rollout, and records the
reason (in ``route show`` and the log). After the 100 % step the candidate is the route's only
variant, and ``alias`` (if given) moves to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from modelpod.errors import ConflictError, ModelNotReadyError, NotFoundError, UsageError
from modelpod.serving.registry import ModelEntry
from modelpod.serving.stats import Mark, Moments, VariantStats, window

if TYPE_CHECKING:
    from modelpod.serving.traffic import Route, TrafficSplit, Variant


def set_aside(entry: ModelEntry) -> None:
    from modelpod.serving.traffic import set_aside as aside

    aside(entry)

log = logging.getLogger("modelpod.serving")
MIN_FEEDBACK = 30  # rewards needed on each side before the reward difference is judged
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
KEYS = ("to", "steps", "every", "max_error_rate", "max_p95_ms", "min_requests", "min_reward_delta", "alias")


def parse_duration(value: Any, where: str) -> float:
    """Seconds from ``60``, ``"60s"``, ``"500ms"``, ``"2m"`` or ``"1h"``."""
    if isinstance(value, bool):
        raise UsageError(f"{where} must be a duration like 60s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if m is None:
            raise UsageError(f"{where} must be a duration like 60s, 500ms or 2m, got {value!r}")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    if not 0 < seconds <= 7 * 86400:
        raise UsageError(f"{where} must be between 0 and 7 days, got {value!r}")
    return seconds


@dataclass(frozen=True)
class RolloutPlan:
    to: str
    steps: tuple[float, ...]
    every_s: float
    max_error_rate: float | None = None
    max_p95_ms: float | None = None
    min_requests: int = 100
    min_reward_delta: float | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, body: Any) -> RolloutPlan:
        if not isinstance(body, Mapping):
            raise UsageError("a rollout must be a JSON object with 'to', 'steps' and 'every'")
        unknown = [str(k) for k in body if k not in KEYS]
        if unknown:
            raise UsageError(f"rollout: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
        to = body.get("to")
        if not isinstance(to, str) or not to:
            raise UsageError("rollout: 'to' must name the candidate, e.g. churn:3")
        raw = body.get("steps", [5, 25, 50, 100])
        if isinstance(raw, str):
            raw = [s for s in raw.split(",") if s.strip()]
        if not isinstance(raw, list) or not raw:
            raise UsageError("rollout: 'steps' must be a list of percentages, e.g. 5,25,50,100")
        steps: list[float] = []
        for s in raw:
            try:
                pct = float(s) if not isinstance(s, bool) else -1.0
            except (TypeError, ValueError):
                raise UsageError(f"rollout: step {s!r} is not a percentage") from None
            if not 0 < pct <= 100 or (steps and pct <= steps[-1]):
                raise UsageError(f"rollout: steps must rise within (0, 100], got {raw!r}")
            steps.append(pct)
        if steps[-1] != 100:
            raise UsageError(f"rollout: the last step must be 100, got {steps[-1]:g}")
        every = parse_duration(body.get("every", "60s"), "rollout: 'every'")

        def limit(key: str, low: float, high: float | None = None) -> float | None:
            value = body.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (
                    high is not None and value > high):
                rng = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
                raise UsageError(f"rollout: {key} must be a number {rng}, got {value!r}")
            return float(value)

        min_requests = body.get("min_requests", 100)
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
            raise UsageError(f"rollout: min_requests must be a positive integer, got {min_requests!r}")
        delta = body.get("min_reward_delta")
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))):
            raise UsageError(f"rollout: min_reward_delta must be a number, got {delta!r}")
        alias = body.get("alias")
        if alias is not None and (not isinstance(alias, str) or not re.match(r"^[A-Za-z][A-Za-z0-9._-]*$", alias)):
            raise UsageError(f"rollout: alias {alias!r} is not a valid alias name")
        return cls(to, tuple(steps), every, limit("max_error_rate", 0.0, 1.0), limit("max_p95_ms", 0.0),
                   min_requests, None if delta is None else float(delta), alias)


def _since(m: Moments, m0: Moments) -> Moments:
    return Moments(m.n - m0.n, m.total - m0.total, m.squares - m0.squares)


class Rollout:
    """One rollout of one route, run as a task on the server's loop."""

    def __init__(self, split: TrafficSplit, route: Route, plan: RolloutPlan, entries: Mapping[str, ModelEntry],
                 candidate: str, baseline: str) -> None:
        self.split, self.route, self.plan = split, route, plan
        self.entries = dict(entries)
        self.candidate, self.baseline = candidate, baseline  # model refs as the spec names them
        self.before = {v.model: v.weight for v in route.spec.variants if v.model != candidate}
        self.state = "running"
        self.reason = ""
        self.waiting = ""
        self.step = -1
        self.done: list[dict[str, Any]] = []
        self.started_at = time.time()
        self.finished_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._rewards0: dict[str, Moments] = {}

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def describe(self) -> dict[str, Any]:
        plan = asdict(self.plan)
        plan["steps"] = list(self.plan.steps)
        out: dict[str, Any] = {
            **plan, "candidate": self.candidate, "baseline": self.baseline, "state": self.state,
            "step": self.plan.steps[self.step] if self.step >= 0 else None, "steps_done": self.done,
            "started_at": _iso(self.started_at),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.waiting and self.running:
            out["waiting"] = self.waiting
        if self.finished_at is not None:
            out["finished_at"] = _iso(self.finished_at)
        return out

    def cancel(self, reason: str) -> None:
        if self.running:
            self.state, self.reason, self.finished_at = "cancelled", reason, time.time()
            if self._task is not None:
                self._task.cancel()

    def _variant(self, ref: str) -> Variant | None:
        return self.route.variant(self.entries[ref].label)

    def _weights(self, pct: float) -> dict[str, float]:
        rest = 100.0 - pct
        total = sum(self.before.values())
        out = {ref: (w / total * rest if total else 0.0) for ref, w in self.before.items()}
        if not total and self.baseline in out:
            out[self.baseline] = rest
        out[self.candidate] = pct
        return out

    async def _run(self) -> None:
        plan = self.plan
        tick = max(0.01, min(0.25, plan.every_s / 10))
        loop = asyncio.get_running_loop()
        try:
            for ref in (self.candidate, self.baseline):
                self._rewards0[ref] = _copy(self.split_stats(ref).rewards)
            for i, pct in enumerate(plan.steps):
                self.split.reweigh(self.route, self._weights(pct), self.entries, self.baseline)
                self.step = i
                cand = self._variant(self.candidate)
                assert cand is not None
                mark, t0 = cand.stats.snapshot(), loop.time()
                log.info("rollout step", extra={"fields": {"route": self.route.spec.name, "candidate": cand.name,
                                                           "percent": pct}})
                while True:
                    await asyncio.sleep(tick)
                    verdict, why, summary = self._judge(cand, mark, pct)
                    if verdict == "breach":
                        self._roll_back(why)
                        return
                    self.waiting = why
                    if verdict == "ok" and loop.time() - t0 >= plan.every_s:
                        self.done.append({"percent": pct, **summary})
                        break
            self._complete()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave a half-moved route behind
            log.exception("rollout failed", extra={"fields": {"route": self.route.spec.name}})
            self._roll_back(f"the rollout itself failed: {type(exc).__name__}: {exc}", state="failed")

    def split_stats(self, ref: str) -> VariantStats:
        return self.route.stats.setdefault(self.entries[ref].label, VariantStats())

    def _judge(self, cand: Variant, mark: Mark, pct: float) -> tuple[str, str, dict[str, Any]]:
        plan = self.plan
        w = window(cand.stats, mark)
        n = w["requests"]
        p95 = w["latency_s"]["p95"]
        summary = {"requests": n, "error_rate": w["error_rate"], "p95_ms": None if p95 is None else p95 * 1000}
        if n < plan.min_requests:
            return "wait", f"{n} of {plan.min_requests} requests at {pct:g} %", summary
        at = f"over {n} requests at {pct:g} %"
        if plan.max_error_rate is not None and w["error_rate"] > plan.max_error_rate:
            return "breach", f"error rate {w['error_rate']:.4f} > {plan.max_error_rate:g} {at}", summary
        if plan.max_p95_ms is not None and p95 is not None and p95 * 1000 > plan.max_p95_ms:
            return "breach", f"p95 latency {p95 * 1000:.2f} ms > {plan.max_p95_ms:g} ms {at}", summary
        if plan.min_reward_delta is not None:
            rc = _since(self.split_stats(self.candidate).rewards, self._rewards0[self.candidate])
            rb = _since(self.split_stats(self.baseline).rewards, self._rewards0[self.baseline])
            if rc.n >= MIN_FEEDBACK and rb.n >= MIN_FEEDBACK and rc.mean is not None and rb.mean is not None:
                delta = rc.mean - rb.mean
                summary["reward_delta"] = delta
                if delta < plan.min_reward_delta:
                    return "breach", (f"reward delta {delta:+.4f} < {plan.min_reward_delta:+g} "
                                      f"({rc.n} vs {rb.n} rewards)"), summary
            else:
                summary["reward_delta"] = None
        return "ok", "", summary

    def _roll_back(self, reason: str, state: str = "rolled_back") -> None:
        """The candidate to 0 % at once; the others as they were before the rollout."""
        completed = self.route.completed
        weights = {v.model: (0.0 if v.model == self.candidate else v.weight) for v in completed.variants}
        if not any(weights.values()):
            weights = {v.model: v.weight for v in completed.variants}
        weights.setdefault(self.candidate, 0.0)  # kept at 0 %: its numbers stay in the report
        self.split.reweigh(self.route, weights, self.entries, completed.baseline)
        self.state, self.reason, self.finished_at = state, reason, time.time()
        self.route.events.append({"at": _iso(self.finished_at), "event": "rollout rolled back",
                                  "candidate": self.entries[self.candidate].label, "reason": reason})
        log.warning("rollout rolled back", extra={"fields": {
            "route": self.route.spec.name, "candidate": self.entries[self.candidate].label, "reason": reason}})

    def _complete(self) -> None:
        entry = self.entries[self.candidate]
        self.split.reweigh(self.route, {self.candidate: 100.0}, self.entries, self.candidate, completed=True)
        if self.plan.alias and entry.version is not None:
            move_alias(self.split, entry.name, entry.version, self.plan.alias)
        self.state, self.finished_at = "completed", time.time()
        self.route.events.append({"at": _iso(self.finished_at), "event": "rollout completed",
                                  "candidate": entry.label, "alias": self.plan.alias})
        log.info("rollout completed", extra={"fields": {"route": self.route.spec.name, "candidate": entry.label,
                                                        "alias": self.plan.alias}})


def _copy(m: Moments) -> Moments:
    return Moments(m.n, m.total, m.squares)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


async def start(split: TrafficSplit, name: str, body: Any) -> Route:
    """Start a progressive rollout of ``body["to"]`` on route ``name`` (loaded first, if need be)."""
    route = split.get(name)
    plan = RolloutPlan.parse(body)
    if route.rollout_running:
        raise ConflictError(f"route {name}: a rollout is already running (to {route.rollout.candidate})")
    if route.spec.policy == "bandit":
        raise ConflictError(f"route {name}: the bandit sets this route's weights; set policy: weighted first")
    entries = entries_of(route)
    known = next((ref for ref, e in entries.items() if ref == plan.to or e.label == plan.to), None)
    if known is not None and known in route.spec.shadow:
        raise UsageError(f"route {name}: {plan.to} is a shadow; a rollout's candidate must not be one")
    candidate = known or plan.to
    if known is None:
        spec = route.spec.with_weights({**{v.model: v.weight for v in route.spec.variants}, plan.to: 0.0},
                                       route.spec.baseline)
        found = split.check(spec, split.specs_with(spec))
        entries[plan.to] = split.register(spec, {plan.to: found[plan.to]})[plan.to]
    entry = entries[candidate]
    baseline = next((ref for ref, e in entries.items() if e.label == route.baseline), None)
    if baseline is None or baseline == candidate:
        raise UsageError(f"route {name}: {plan.to} is the baseline already; roll out another version")
    if not entry.ready:
        entry.on_demand, entry.failed = True, False
        try:
            await split.registry.load(entry)
        except Exception as exc:
            set_aside(entry)
            raise ModelNotReadyError(f"route {name}: {entry.label} did not load ({exc}); "
                                     "the route is unchanged") from None
    if route.rollout_running:  # another one started while this candidate loaded
        raise ConflictError(f"route {name}: a rollout is already running (to {route.rollout.candidate})")
    route.rollout = Rollout(split, route, plan, entries, candidate, baseline)
    route.rollout.start()
    return route


async def rollback(split: TrafficSplit, name: str) -> Route:
    """Back to the last completed state: the one before a running rollout, or the one before the
    current one (its aliases put back too)."""
    route = split.get(name)
    if route.rollout_running:
        rollout = route.rollout
        rollout.cancel("rolled back by request")
        split.install(route.completed, rollout.entries, completed=False)
        route.events.append({"at": _iso(time.time()), "event": "rollout rolled back", "reason": "by request"})
        log.warning("rollout rolled back", extra={"fields": {"route": name, "reason": "by request"}})
        return route
    if not route.history:
        raise ConflictError(f"route {name} has no earlier completed state to roll back to")
    spec, aliases = route.history[-1]
    found = split.check(spec, split.specs_with(spec))
    entries = split.register(spec, found)
    await split.load_all(spec, entries)  # what was unloaded since is loaded again first
    if not any(entries[v.model].ready for v in spec.variants if v.weight > 0):
        raise ModelNotReadyError(f"route {name}: the earlier state's variants did not load; the route is unchanged")
    route.history.pop()
    split.install(spec, entries, completed=False)
    route.completed = spec
    for key, version in aliases.items():
        model, _, alias = key.partition("@")
        if not any(e.version == version and alias in e.aliases for e in split.registry.versions(model).values()):
            move_alias(split, model, version, alias)
    route.events.append({"at": _iso(time.time()), "event": "rolled back to the previous completed state"})
    log.warning("route rolled back", extra={"fields": {"route": name, "weights": route.describe()["weights"]}})
    return route


def entries_of(route: Route) -> dict[str, ModelEntry]:
    """The served entry of each model ref the route's spec names (variants and shadows)."""
    out = {v.model: route.variants[i].entry for i, v in enumerate(route.spec.variants)}
    out.update({ref: route.shadows[i].entry for i, ref in enumerate(route.spec.shadow)})
    return out


def move_alias(split: TrafficSplit, name: str, version: int, alias: str) -> None:
    """Point ``name@alias`` at ``version`` in the store (if any) and in the served entries."""
    store = split.registry.store()
    if store is not None:
        with contextlib.suppress(NotFoundError):
            store.tag(name, version, alias)
    for e in split.registry.versions(name).values():
        if e.version == version:
            e.aliases = e.aliases | {alias}
        elif alias in e.aliases:
            e.aliases = e.aliases - {alias}
    log.info("alias moved", extra={"fields": {"model": name, "alias": alias, "version": version}})
