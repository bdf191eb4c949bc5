"""Feedback joins, the route report, and the bandit's weights.

Every routed answer's id is kept, with the variant that gave it and (when small) its outputs, for
``FEEDBACK_TTL_S`` seconds, the last ``FEEDBACK_IDS`` to twice that many answers per route. ``POST
/v2/models/{route}/feedback`` with ``{"id", "reward"}`` or ``{"id", "label"}`` joins an outcome to
that variant; an id that was never seen, or has been forgotten, is a 404 that says which.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from modelpod.errors import ConflictError, InvalidRequestError, NotFoundError
from modelpod.model import Batch
from modelpod.serving.metrics import CounterFunc, GaugeFunc, _Family
from modelpod.serving.stats import Moments, mean_ci, msprt_p, window

if TYPE_CHECKING:
    from modelpod.serving.traffic import Route, TrafficSplit, Variant

FEEDBACK_IDS = 100_000
FEEDBACK_TTL_S = 3600.0
KEEP_OUTPUT_BYTES = 64 * 1024  # answers larger than this are kept without outputs (reward only)
THOMPSON_DRAWS = 4000


# What is kept per answer: (variant, perf_counter time, outputs or None).
Sent = tuple[str, float, "Batch | None"]


class Answers:
    """The recent answers of one route, kept for feedback joins.

    An answer that came without an id gets one made here: the route's random prefix and a
    sequence number, and its variant, time and outputs go to three lists at that number's place
    (three appends: no tuple, no hashing, nothing for the garbage collector to track). An id a
    client gave keys a dict instead. Answers live in two generations of up to ``FEEDBACK_IDS``
    each: when the newer fills, the older is dropped; a dropped client id is remembered (key only)
    as expired for one more generation, and every made-up number below the oldest kept is expired.
    Nothing is ever scanned."""

    __slots__ = ("base", "gone", "named_new", "named_old", "new_start", "outputs", "prefix", "seq", "times",
                 "variants")

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex() + "-"
        self.seq = 0  # the number the next made-up id gets
        self.base = 0  # the number kept at index 0 of the lists (the older generation's first)
        self.new_start = 0  # the newer generation's first number
        self.variants: list[str | None] = []  # None once the answer has feedback
        self.times: list[float] = []
        self.outputs: list[Batch | None] = []
        self.named_new: dict[str, Sent | None] = {}
        self.named_old: dict[str, Sent | None] = {}
        self.gone: dict[str, Sent | None] = {}

    def keep(self, rid: str | None, variant: str, outputs: Batch, now: float) -> str:
        """Keep one answer (its outputs only when small); its id, made up when ``rid`` is None."""
        size = 0
        for arr in outputs.values():
            size += arr.nbytes
        kept = outputs if size <= KEEP_OUTPUT_BYTES else None
        if rid is None:
            n = self.seq
            self.seq = n + 1
            self.variants.append(variant)
            self.times.append(now)
            self.outputs.append(kept)
            rid = f"{self.prefix}{n}"
        else:
            self.named_new[rid] = (variant, now, kept)
        if self.seq - self.new_start + len(self.named_new) >= FEEDBACK_IDS:
            self._rotate()
        return rid

    def _rotate(self) -> None:
        drop = self.new_start - self.base
        del self.variants[:drop], self.times[:drop], self.outputs[:drop]
        self.base, self.new_start = self.new_start, self.seq
        self.gone, self.named_old, self.named_new = self.named_old, self.named_new, {}

    def _number(self, rid: str) -> int | None:
        """The number in a made-up id (None when ``rid`` is no id made here)."""
        if not rid.startswith(self.prefix):
            return None
        digits = rid[len(self.prefix):]
        return int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 20 else None

    def _slot(self, rid: str) -> int | None:
        """The list index of a made-up id still kept (None otherwise)."""
        n = self._number(rid)
        return None if n is None or not self.base <= n < self.seq else n - self.base

    def find(self, rid: str) -> tuple[bool, Sent | None]:
        """(whether ``rid`` is kept, what was kept: None once it has feedback)."""
        for named in (self.named_new, self.named_old):
            if rid in named:
                return True, named[rid]
        i = self._slot(rid)
        if i is None:
            return False, None
        variant = self.variants[i]
        return True, None if variant is None else (variant, self.times[i], self.outputs[i])

    def answered(self, rid: str) -> None:
        """``rid`` has its feedback: a second one is refused (and its outputs are let go)."""
        for named in (self.named_new, self.named_old):
            if rid in named:
                named[rid] = None
                return
        i = self._slot(rid)
        if i is not None:
            self.variants[i] = self.outputs[i] = None

    def expired(self, rid: str) -> bool:
        if rid in self.gone:
            return True
        n = self._number(rid)
        return n is not None and n < self.base

    def __len__(self) -> int:
        return self.seq - self.base + len(self.named_new) + len(self.named_old)


def _labels_of(outputs: Batch) -> list[Any]:
    """The predicted label per row: a 1-D label output if there is one, else the argmax of the scores."""
    arrays = [np.asarray(a) for a in outputs.values()]
    for a in arrays:
        if a.ndim == 1 and a.dtype.kind in "iubUSO":
            return [_plain(x) for x in a.tolist()]
    first = arrays[0]
    if first.ndim == 2 and first.shape[1] > 1 and first.dtype.kind == "f":
        return [int(i) for i in first.argmax(axis=1)]
    return [_plain(x) for x in first.reshape(len(first), -1)[:, 0].tolist()] if first.ndim else [_plain(first.item())]


def _plain(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def feedback(route: Route, body: Any, now: float) -> dict[str, Any]:
    """Join one outcome to the variant that answered ``body["id"]``."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError('feedback must be a JSON object: {"id": REQUEST_ID, "reward": NUMBER} or "label"')
    unknown = [k for k in body if k not in ("id", "reward", "label")]
    if unknown:
        raise InvalidRequestError(f"feedback: unknown key(s) {', '.join(map(str, unknown))}; known: id, reward, label")
    rid = body.get("id")
    if not isinstance(rid, str) or not rid:
        raise InvalidRequestError("feedback: 'id' must be the id of an answer (a non-empty string)")
    if ("reward" in body) == ("label" in body):
        raise InvalidRequestError("feedback: give exactly one of 'reward' (a number) or 'label' (the true class)")
    reward = body.get("reward")
    if "reward" in body and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                             or not math.isfinite(reward)):
        raise InvalidRequestError(f"feedback: 'reward' must be a finite number, got {reward!r}")
    name = route.spec.name
    kept, sent = route.ids.find(rid)
    if not kept or (sent is not None and sent[1] < now - FEEDBACK_TTL_S):
        if kept or route.ids.expired(rid):
            raise NotFoundError(f"request id {rid!r} has expired: route {name} keeps the ids of at least its last "
                                f"{FEEDBACK_IDS} answers, for {FEEDBACK_TTL_S:g} s")
        raise NotFoundError(f"unknown request id {rid!r}: route {name} answered no request with that id")
    if sent is None:
        raise ConflictError(f"request id {rid!r} already has feedback")
    variant, _, outputs = sent
    stats = route.stats.get(variant)
    if stats is None:  # pragma: no cover - stats live as long as the route
        raise NotFoundError(f"variant {variant} is no longer known to route {name}")
    out: dict[str, Any] = {"id": rid, "route": name, "variant": variant}
    if "reward" in body:
        reward = float(body["reward"])
    else:
        if outputs is None:
            raise InvalidRequestError(f"request id {rid!r}: the answer was too large to keep; send a 'reward'")
        truth = body["label"]
        truths = truth if isinstance(truth, list) else [truth]
        predicted = _labels_of(outputs)
        if len(truths) != len(predicted):
            raise InvalidRequestError(f"feedback: {len(truths)} label(s) for an answer of {len(predicted)} row(s)")
        correct = sum(_plain(t) == p for t, p in zip(truths, predicted, strict=True))
        stats.labels += len(truths)
        stats.correct += correct
        reward = correct / len(truths)
        out.update(predicted=predicted if isinstance(truth, list) else predicted[0], correct=correct == len(truths))
    route.ids.answered(rid)  # a second outcome is refused
    stats.rewards.add(reward)
    if not 0.0 <= reward <= 1.0:
        route.unit_rewards = False
    out["reward"] = reward
    _update_p(route)
    return out


def _error_moments(requests: int, errors: int) -> Moments:
    return Moments(requests, float(errors), float(errors))


def _update_p(route: Route) -> None:
    """One more reading of every always-valid p-value (kept as running minima)."""
    base = route.stats.get(route.baseline)
    if base is None:
        return
    for v in route.variants:
        if v.name == route.baseline:
            continue
        for metric, a, b in (("reward", base.rewards, v.stats.rewards),
                             ("error_rate", _error_moments(base.requests, base.errors),
                              _error_moments(v.stats.requests, v.stats.errors))):
            p = msprt_p(a, b)
            if p is not None:
                key = (route.baseline, v.name, metric)
                route.pmin[key] = min(route.pmin.get(key, 1.0), p)


def report(route: Route) -> dict[str, Any]:
    """Per variant: requests, errors, latency percentiles, reward, accuracy, shadow agreement and,
    against the baseline, differences with always-valid p-values."""
    _update_p(route)
    refresh_bandit(route, force=True)
    total = sum(route.weights) or 1.0
    base = route.stats.get(route.baseline)
    rows: list[dict[str, Any]] = []
    weights = dict(zip((v.name for v in route.variants), route.weights, strict=True))
    for v in (*route.variants, *route.shadows):
        st = v.stats
        w = window(st)
        lat = {k: (None if x is None else x * 1000.0) for k, x in w["latency_s"].items() if k != "samples"}
        is_shadow = v in route.shadows
        row: dict[str, Any] = {
            "variant": v.name, "role": "shadow" if is_shadow else ("baseline" if v.name == route.baseline else
                                                                    "variant"),
            "status": v.status, "weight": None if is_shadow else weights.get(v.name, 0.0),
            "share": None if is_shadow else weights.get(v.name, 0.0) / total,
            "requests": w["requests"], "errors": w["errors"], "error_rate": w["error_rate"], "latency_ms": lat,
            "reward": mean_ci(st.rewards),
            "accuracy": {"n": st.labels, "value": st.correct / st.labels if st.labels else None},
        }
        if is_shadow:
            row["shadow"] = {"compared": st.shadow_compared, "agreement": st.agreement, "dropped": st.shadow_dropped,
                             "errors": st.shadow_errors}
        elif base is not None and v.name != route.baseline:
            ra, rb = base.rewards.mean, st.rewards.mean
            ea = base.errors / base.requests if base.requests else None
            eb = st.errors / st.requests if st.requests else None
            row["vs_baseline"] = {
                "reward_delta": None if ra is None or rb is None else rb - ra,
                "reward_p_value": route.pmin.get((route.baseline, v.name, "reward")),
                "error_rate_delta": None if ea is None or eb is None else eb - ea,
                "error_rate_p_value": route.pmin.get((route.baseline, v.name, "error_rate")),
            }
        rows.append(row)
    return {"route": route.spec.name, "policy": route.spec.policy, "baseline": route.baseline,
            "status": route.status, "variants": rows,
            "test": "mixture SPRT (Johari et al. 2017), normal approximation; p-values are always valid"}


def thompson(route: Route, rng: np.random.Generator) -> list[float] | None:
    """Each variant's probability of having the best mean reward, by Thompson sampling (None until
    there is feedback)."""
    stats = [v.stats.rewards for v in route.variants]
    if not any(m.n for m in stats):
        return None
    draws = []
    for m in stats:
        if route.unit_rewards:
            draws.append(rng.beta(1.0 + m.total, 1.0 + m.n - m.total, THOMPSON_DRAWS))
        else:
            mean = m.mean if m.mean is not None else 0.0
            var = m.variance if m.variance is not None else 1.0
            draws.append(rng.normal(mean, math.sqrt(max(var, 1e-12) / max(1, m.n)), THOMPSON_DRAWS))
    best = np.argmax(np.stack(draws), axis=0)
    return [float(np.mean(best == i)) for i in range(len(stats))]


_RNGS: list[np.random.Generator] = []  # the server's one generator, made on a bandit's first use:
# numpy.random (25 modules, its C generators among them) is imported only where a bandit runs


def _rng() -> np.random.Generator:
    if not _RNGS:
        _RNGS.append(np.random.default_rng())
    return _RNGS[0]


def refresh_bandit(route: Route, *, force: bool = False, now: float = 0.0, rng: np.random.Generator | None = None
                   ) -> None:
    """Put the bandit's weights in force: ``floor + (1 - k * floor) * P(best)`` per variant."""
    if route.spec.policy != "bandit" or route.rollout_running:
        return
    if not force and now - route.bandit_at < 0.05:
        return
    route.bandit_at = now
    probs = thompson(route, rng or _rng())
    if probs is None:
        return
    floor, k = route.spec.floor, len(probs)
    route.set_weights(floor + (1.0 - k * floor) * p for p in probs)


def route_metrics(split: TrafficSplit) -> list[_Family]:
    """The route families: traffic share, shadow agreement and copies, feedback."""
    labels = ("model", "version", "route", "variant")

    def rows(read: Any, shadows: bool = False) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for route in split.routes.values():
            for v in (route.shadows if shadows else route.variants):
                value = read(route, v)
                if value is not None:
                    out.append(((v.entry.name, v.entry.version_text, route.spec.name, v.name), float(value)))
        return out

    def share(route: Route, v: Variant) -> float:
        total = sum(route.weights) or 1.0
        return route.weights[route.variants.index(v)] / total

    def shadow_counts() -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for route in split.routes.values():
            for v in route.shadows:
                key = (v.entry.name, v.entry.version_text, route.spec.name, v.name)
                st = v.stats
                out += [((*key, "compared"), st.shadow_compared), ((*key, "dropped"), st.shadow_dropped),
                        ((*key, "error"), st.shadow_errors)]
        return out

    return [
        GaugeFunc("modelpod_route_share", "Share of a route's traffic each variant gets now (0..1).", labels,
                  lambda: rows(share)),
        GaugeFunc("modelpod_shadow_agreement",
                  "Share of shadow copies whose answer agreed with the primary's (equal argmax, or values "
                  "within the tolerance).", labels, lambda: rows(lambda r, v: v.stats.agreement, True)),
        CounterFunc("modelpod_shadow_requests_total", "Shadow copies, by outcome (compared, dropped, error).",
                    (*labels, "outcome"), shadow_counts),
        CounterFunc("modelpod_feedback_total", "Feedback joined to a variant's answers.", labels,
                    lambda: rows(lambda r, v: v.stats.rewards.n)),
        GaugeFunc("modelpod_feedback_reward_mean", "Mean feedback reward of a variant.", labels,
                  lambda: rows(lambda r, v: v.stats.rewards.mean)),
    ]
