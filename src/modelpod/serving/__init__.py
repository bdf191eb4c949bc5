"""Serving: the InferenceEngine and what it is made of. Importing this never needs grpcio."""

from __future__ import annotations

from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.messages import InferRequest, InferResult
from modelpod.serving.registry import ModelEntry, ModelState

__all__ = ["BatchPolicy", "InferRequest", "InferResult", "InferenceEngine", "ModelEntry", "ModelState", "ServeConfig"]
