"""Route specs: the ``routes:`` section of ``--config`` and the JSON body of ``PUT /v2/routes/{name}``.

One schema for both::

    churn:
      variants:
        - {model: "churn:2", weight: 90}
        - {model: "churn:3", weight: 10}
      shadow: ["churn:4"]          # a copy of each request; its answer is never returned
      sticky: {header: x-user-id}  # the same key always gets the same variant
      policy: weighted             # or bandit (Thompson sampling on feedback rewards)
      floor: 0.05                  # bandit only: the least share of traffic any variant gets
      baseline: "churn:2"          # what the report compares against (default: the largest weight)
      shadow_tolerance: 1e-6       # values this close count as agreeing

This module checks the shape only; what the names refer to is checked by the traffic split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelpod.errors import UsageError

POLICIES = ("weighted", "bandit")
KEYS = ("variants", "shadow", "sticky", "policy", "floor", "baseline", "shadow_tolerance")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[0-9]+|@[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")


@dataclass(frozen=True)
class VariantSpec:
    model: str
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "weight": _plain(self.weight)}


@dataclass(frozen=True)
class RouteSpec:
    name: str
    variants: tuple[VariantSpec, ...]
    shadow: tuple[str, ...] = ()
    sticky: str | None = None  # the header (gRPC: metadata key) holding the sticky key, lower case
    policy: str = "weighted"
    floor: float = 0.05
    baseline: str | None = None
    shadow_tolerance: float = 1e-6

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variants": [v.to_dict() for v in self.variants], "shadow": list(self.shadow),
                               "policy": self.policy}
        if self.sticky:
            out["sticky"] = {"header": self.sticky}
        if self.policy == "bandit":
            out["floor"] = self.floor
        if self.baseline:
            out["baseline"] = self.baseline
        if self.shadow_tolerance != 1e-6:
            out["shadow_tolerance"] = self.shadow_tolerance
        return out

    def with_weights(self, weights: Mapping[str, float], baseline: str | None = None) -> RouteSpec:
        """The same route with these variants and weights, in this order (and this baseline)."""
        variants = tuple(VariantSpec(m, float(w)) for m, w in weights.items())
        return RouteSpec(self.name, variants, self.shadow, self.sticky, self.policy, self.floor,
                         baseline if baseline in weights else None, self.shadow_tolerance)

    def models(self) -> tuple[str, ...]:
        return tuple(v.model for v in self.variants) + self.shadow


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} must be a number, got {value!r}")
    return float(value)


def _ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _REF.match(value):
        raise UsageError(f"{where}: {value!r} is not a model reference (NAME, NAME:VERSION or NAME@ALIAS)")
    return value


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"route name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    return name


def parse_route(name: Any, data: Any) -> RouteSpec:
    """One route from its mapping; raises UsageError naming the first problem."""
    name = check_name(name)
    where = f"route {name}"
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: must be a mapping with 'variants'")
    unknown = [str(k) for k in data if k not in KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    raw = data.get("variants")
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{where}: 'variants' must be a non-empty list of {{model, weight}}")
    variants: list[VariantSpec] = []
    for i, item in enumerate(raw):
        at = f"{where}: variants[{i}]"
        if not isinstance(item, Mapping):
            raise UsageError(f"{at} must be a mapping {{model: NAME:VERSION, weight: N}}")
        extra = [str(k) for k in item if k not in ("model", "weight")]
        if extra:
            raise UsageError(f"{at}: unknown key(s) {', '.join(extra)}; known: model, weight")
        if "weight" not in item:
            raise UsageError(f"{at}: 'weight' is missing")
        model = _ref(item.get("model"), f"{at}.model")
        weight = _number(item["weight"], f"{at}.weight")
        if weight < 0:
            raise UsageError(f"{at}.weight must not be negative, got {item['weight']!r}")
        if any(v.model == model for v in variants):
            raise UsageError(f"{where}: variant {model} is listed twice")
        variants.append(VariantSpec(model, weight))
    if sum(v.weight for v in variants) <= 0:
        raise UsageError(f"{where}: the weights are all zero; give at least one variant a positive weight")
    shadow_raw = data.get("shadow") or []
    if isinstance(shadow_raw, str):
        shadow_raw = [shadow_raw]
    if not isinstance(shadow_raw, list):
        raise UsageError(f"{where}: 'shadow' must be a list of model references")
    shadow: list[str] = []
    for i, s in enumerate(shadow_raw):
        ref = _ref(s, f"{where}: shadow[{i}]")
        if any(v.model == ref for v in variants):
            raise UsageError(f"{where}: {ref} is both a variant and a shadow; a shadow's answers are never returned")
        if ref in shadow:
            raise UsageError(f"{where}: shadow {ref} is listed twice")
        shadow.append(ref)
    sticky = _sticky(data.get("sticky"), where)
    policy = data.get("policy", "weighted")
    if policy not in POLICIES:
        raise UsageError(f"{where}: policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    floor = _number(data.get("floor", 0.05), f"{where}: floor")
    if not 0 <= floor * len(variants) <= 1:
        raise UsageError(f"{where}: floor {floor:g} times {len(variants)} variants must be between 0 and 1")
    baseline = data.get("baseline")
    if baseline is not None and not any(v.model == baseline for v in variants):
        raise UsageError(f"{where}: baseline {baseline!r} is not one of the variants")
    tol = _number(data.get("shadow_tolerance", 1e-6), f"{where}: shadow_tolerance")
    if tol < 0:
        raise UsageError(f"{where}: shadow_tolerance must not be negative")
    return RouteSpec(name, tuple(variants), tuple(shadow), sticky, str(policy), floor, baseline, tol)


def _sticky(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"header"}:
        raise UsageError(f"{where}: 'sticky' must be {{header: NAME}}")
    header = value["header"]
    if not isinstance(header, str) or not _HEADER.match(header):
        raise UsageError(f"{where}: sticky header {header!r} is not a valid header name")
    return header.lower()


def parse_routes(data: Any) -> dict[str, RouteSpec]:
    """The ``routes:`` mapping of a config file."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError("config: 'routes' must map route names to {variants: [...]}")
    return {str(name): parse_route(name, spec) for name, spec in data.items()}
