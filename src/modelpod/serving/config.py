"""Serving policy per model: the pod's defaults, then the config file and the command line.

Precedence, lowest first: the manifest's ``serving`` section, the config file's global keys, the
settings (``--max-batch-rows``/``--max-batch-wait-ms``/``MODELPOD_*``, which apply to every model),
then the config file's ``models: {name: {...}}`` entry, which is the most specific.
The file's ``routes:`` section (traffic splits; see ``serving/routes.py``) is parsed here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from modelpod.errors import PodError, UsageError
from modelpod.inputs import NONFINITE
from modelpod.pod import Serving
from modelpod.serving.routes import RouteSpec, parse_routes
from modelpod.settings import Settings
from modelpod.trust.policy import TrustPolicy

# The server's policy for a model is the same record a pod carries as its defaults.
BatchPolicy = Serving

POLICY_KEYS: tuple[str, ...] = tuple(f.name for f in fields(BatchPolicy))
_INTS = {"max_batch_rows", "max_queue", "max_concurrency"}


def _checked(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in POLICY_KEYS:
            raise UsageError(f"{where}: unknown key {key!r}; known: {', '.join(POLICY_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: {key} must be a number, got {value!r}")
        if key in _INTS and int(value) != value:
            raise UsageError(f"{where}: {key} must be an integer, got {value!r}")
        out[key] = int(value) if key in _INTS else float(value)
    return out


def _nonfinite(values: dict[str, Any], name: str, where: str) -> dict[str, str]:
    """Pop ``nonfinite`` from ``values``: {name: policy} when given."""
    if "nonfinite" not in values:
        return {}
    policy = values.pop("nonfinite")
    if policy not in NONFINITE:
        raise UsageError(f"{where}: nonfinite must be one of {', '.join(NONFINITE)}, got {policy!r}")
    return {name: str(policy)}


@dataclass(frozen=True)
class ServeConfig:
    """The parsed ``--config`` file plus the settings that override every model."""

    global_keys: Mapping[str, Any] = field(default_factory=dict)
    settings_keys: Mapping[str, Any] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # NaN/Infinity policy (``nonfinite: pass|reject``): the global key, then per model.
    nonfinite_keys: Mapping[str, str] = field(default_factory=dict)

    def nonfinite(self, name: str) -> str:
        """``pass`` (the default: NaN/Infinity reach the model) or ``reject`` (refused with a 400)."""
        return self.nonfinite_keys.get(name) or self.nonfinite_keys.get("", "pass")
    routes: Mapping[str, RouteSpec] = field(default_factory=dict)
    # The config's ``trust:`` section over the settings (modelpod.trust.policy); None: settings only.
    trust: TrustPolicy | None = None

    def policy(self, name: str, serving: Serving | None = None) -> BatchPolicy:
        base = asdict(serving) if serving is not None else {}
        merged = {k: v for k, v in base.items() if k in POLICY_KEYS}
        merged.update(self.global_keys)
        merged.update(self.settings_keys)
        merged.update(self.models.get(name, {}))
        try:
            return BatchPolicy(**merged)
        except PodError as exc:
            raise UsageError(f"serving policy for {name}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Settings, data: Mapping[str, Any] | None = None) -> ServeConfig:
        overrides = {
            "max_batch_rows": settings.max_batch_rows,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "max_queue": settings.max_queue,
            "timeout_s": settings.request_timeout_s,
        }
        settings_keys = _checked({k: v for k, v in overrides.items() if v is not None}, "settings")
        data = dict(data or {})
        trust = TrustPolicy.from_settings(settings, {"trust": data.pop("trust", None)},
                                          Path(settings.config).parent if settings.config else None)
        routes = parse_routes(data.pop("routes", None))
        raw_models = data.pop("models", None) or {}
        if not isinstance(raw_models, Mapping):
            raise UsageError("config: 'models' must map model names to settings")
        nonfinite = _nonfinite(data, "", "config")
        models: dict[str, dict[str, Any]] = {}
        for name, values in raw_models.items():
            if not isinstance(values, Mapping):
                raise UsageError(f"config: models.{name} must be a mapping")
            values = dict(values)
            nonfinite.update(_nonfinite(values, str(name), f"config: models.{name}"))
            models[str(name)] = _checked(values, f"config: models.{name}")
        return cls(_checked(data, "config"), settings_keys, models, nonfinite, routes, trust)

    @classmethod
    def load(cls, settings: Settings) -> ServeConfig:
        """Read ``settings.config`` (if any) and combine it with the settings' overrides."""
        data: Any = None
        if settings.config is not None:
            path = Path(settings.config)
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise UsageError(f"--config {path}: {exc.strerror or exc}") from None
            except yaml.YAMLError as exc:
                raise UsageError(f"--config {path}: not valid YAML: {exc}") from None
            if data is not None and not isinstance(data, Mapping):
                raise UsageError(f"--config {path}: must hold a mapping")
        return cls.from_settings(settings, data)
