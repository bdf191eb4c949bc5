"""Serving: the InferenceEngine and what it is made of. Importing this never needs grpcio.

The names below are imported on first use, so a replica process (``serving/replica_child.py``),
which needs none of them, does not pay for the engine's imports at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpod.serving.config import BatchPolicy, ServeConfig
    from modelpod.serving.engine import InferenceEngine
    from modelpod.serving.messages import InferRequest, InferResult
    from modelpod.serving.registry import ModelEntry, ModelState

_HOMES = {
    "BatchPolicy": "config", "ServeConfig": "config", "InferenceEngine": "engine", "InferRequest": "messages",
    "InferResult": "messages", "ModelEntry": "registry", "ModelState": "registry",
}
__all__ = ["BatchPolicy", "InferRequest", "InferResult", "InferenceEngine", "ModelEntry", "ModelState", "ServeConfig"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'modelpod.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(f"modelpod.serving.{home}"), name)
