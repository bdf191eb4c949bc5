"""Replica policy per model: ``isolation``, ``replicas`` and ``max_memory``, parsed and merged.

Sources, lowest precedence first, as for batching (``serving/config.py``): the pod manifest's
``serving`` section, the config file's global keys, the command line (``--isolation``,
``--replicas``, ``--target-inflight``, ``--upscale-delay-s``, ``--downscale-delay-s``,
``--max-memory``; or ``MODELPOD_*``), then the config file's ``models: {NAME: {...}}`` entry.

``replicas`` is a mapping ``{min, max, target_inflight, upscale_delay_s, downscale_delay_s}``, a
number N (exactly N), or ``"MIN:MAX"``. ``max_memory`` is bytes, or a size like ``512MiB``/``2GB``.
Every bad value is a ``UsageError`` (``modelpod serve`` exits 2 with the message).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from modelpod.errors import UsageError

ISOLATIONS = ("thread", "process")
REPLICA_KEYS = ("isolation", "replicas", "max_memory")  # the keys this module owns in a serving section
SCALE_KEYS = ("min", "max", "target_inflight", "upscale_delay_s", "downscale_delay_s")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class ReplicaPolicy:
    """How one model version runs: on the server's threads, or in ``min``..``max`` processes."""

    isolation: str = "thread"
    min: int = 1
    max: int = 1
    target_inflight: float = 2.0  # in-flight batches per replica the autoscaler aims at
    upscale_delay_s: float = 1.0  # demand must stay above target this long before scaling up
    downscale_delay_s: float = 30.0  # ... and below it this long before scaling down (longer)
    max_memory: int | None = None  # bytes of RSS after which a replica is recycled between batches

    @property
    def process(self) -> bool:
        return self.isolation == "process"

    @property
    def autoscaled(self) -> bool:
        return self.max > self.min

    def describe(self) -> str:
        if not self.process:
            return "thread"
        count = str(self.min) if self.min == self.max else f"{self.min}..{self.max}"
        return f"process x{count}"


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a size text (``512MiB``, ``2GB``, ``1.5G``)."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: max_memory must be a size like 512MiB or a number of bytes, got {value!r}")
    if isinstance(value, int | float) and value > 0 and math.isfinite(value):
        return int(value)
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"{where}: max_memory must be a size like 512MiB or a number of bytes, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _number(value: Any, key: str, where: str, *, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{where}: replicas.{key} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise UsageError(f"{where}: replicas.{key} must be an integer, got {value!r}")
    return value


def parse_replicas(value: Any, where: str) -> dict[str, Any]:
    """The scaling keys one layer sets: from a mapping, N, or ``MIN:MAX`` (checked, not yet merged)."""
    if isinstance(value, str):
        parts = value.split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(parts) not in (1, 2) or len(nums) != len(parts):
            raise UsageError(f"{where}: replicas must be N or MIN:MAX (e.g. 2 or 0:4), got {value!r}")
        value = {"min": nums[0], "max": nums[-1]}
    elif isinstance(value, int) and not isinstance(value, bool):
        value = {"min": value, "max": value}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: replicas must be a mapping {{min, max, target_inflight, ...}}, N or MIN:MAX, "
                         f"got {value!r}")
    out: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in SCALE_KEYS:
            raise UsageError(f"{where}: unknown key replicas.{key}; known: {', '.join(SCALE_KEYS)}")
        num = _number(raw, str(key), where, integer=key in ("min", "max"))
        out[str(key)] = int(num) if key in ("min", "max") else float(num)
    return out


def parse_layer(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``ReplicaPolicy`` fields one layer (a serving section, the settings) sets."""
    out: dict[str, Any] = {}
    if values.get("isolation") is not None:
        iso = values["isolation"]
        if iso not in ISOLATIONS:
            raise UsageError(f"{where}: isolation must be one of {', '.join(ISOLATIONS)}, got {iso!r}")
        out["isolation"] = str(iso)
    if values.get("replicas") is not None:
        out.update(parse_replicas(values["replicas"], where))
    if values.get("max_memory") is not None:
        out["max_memory"] = parse_size(values["max_memory"], where)
    return out


def pop_layer(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Take this module's keys out of a config section (the rest is batching) and parse them."""
    return parse_layer({k: values.pop(k) for k in REPLICA_KEYS if k in values}, where)


def settings_layer(settings: Any) -> dict[str, Any]:
    """The command line's (or ``MODELPOD_*``'s) replica settings, which apply to every model."""
    where = "command line"
    scale = {k: getattr(settings, k, None) for k in ("target_inflight", "upscale_delay_s", "downscale_delay_s")}
    out = parse_layer({"isolation": getattr(settings, "isolation", None),
                       "replicas": getattr(settings, "replicas", None),
                       "max_memory": getattr(settings, "max_memory", None)}, where)
    extra = {k: v for k, v in scale.items() if v is not None}
    if extra:
        out.update(parse_replicas(extra, where))
    return out


def merge(layers: list[Mapping[str, Any]], where: str) -> ReplicaPolicy:
    """One policy from layers, lowest precedence first; the combination is checked once."""
    policy = ReplicaPolicy()
    fields: dict[str, Any] = {}
    for layer in layers:
        fields.update(layer)
        if "min" in layer and "max" not in layer:  # a lone min lifts max with it
            fields["max"] = max(int(layer["min"]), int(fields.get("max", policy.max)))
    policy = replace(policy, **fields)
    problems = []
    if policy.min < 0:
        problems.append(f"replicas.min must be >= 0, got {policy.min}")
    if policy.max < 1:
        problems.append(f"replicas.max must be >= 1, got {policy.max}")
    if policy.min > policy.max:
        problems.append(f"replicas.min ({policy.min}) is above replicas.max ({policy.max})")
    if policy.target_inflight <= 0:
        problems.append(f"replicas.target_inflight must be > 0, got {policy.target_inflight:g}")
    if policy.upscale_delay_s < 0 or policy.downscale_delay_s < 0:
        problems.append("replicas.upscale_delay_s and downscale_delay_s must be >= 0")
    if problems:
        raise UsageError(f"{where}: " + "; ".join(problems))
    return policy


def add_arguments(c: argparse.ArgumentParser) -> None:
    """``modelpod serve``'s replica flags (every model; the config file's ``models:`` entries win)."""
    g = c.add_argument_group("replicas (docs/replicas.md)")
    g.add_argument("--isolation", choices=ISOLATIONS,
                   help="run each model on the server's threads (default) or in worker processes")
    g.add_argument("--replicas", metavar="N|MIN:MAX",
                   help="worker processes per model version with --isolation process (default 1; 0:4 "
                        "scales between 0 and 4)")
    g.add_argument("--target-inflight", type=float, metavar="X",
                   help="in-flight batches per replica the autoscaler aims at (default 2)")
    g.add_argument("--upscale-delay-s", type=float, metavar="S", help="demand above target this long scales up (1)")
    g.add_argument("--downscale-delay-s", type=float, metavar="S",
                   help="demand below target this long scales down (30)")
    g.add_argument("--max-memory", metavar="SIZE", help="recycle a replica whose RSS passes SIZE (e.g. 2GiB)")


def settings_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Settings`` fields the flags set (None where not given)."""
    return {k: getattr(args, k, None) for k in ("isolation", "replicas", "target_inflight", "upscale_delay_s",
                                                 "downscale_delay_s", "max_memory")}
