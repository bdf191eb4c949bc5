"""Serving: the InferenceEngine and what it is made of. Importing this never needs grpcio."""

from __future__ import annotations

from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.engine import InferenceEngine, InferResult
from modelpod.serving.registry import ModelEntry, ModelState

__all__ = ["BatchPolicy", "InferResult", "InferenceEngine", "ModelEntry", "ModelState", "ServeConfig"]
