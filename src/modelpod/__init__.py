"""modelpod: model containers — pack, version, build and serve machine-learning models."""

from __future__ import annotations

__version__ = "0.1.0"

from modelpod.api import load, open_pod, pack
from modelpod.errors import ModelpodError
from modelpod.frameworks.python import Tensor
from modelpod.model import Model
from modelpod.pod import Manifest, Pod, Signature, TensorSpec
from modelpod.settings import Settings
from modelpod.store import PodRecord, Store

__all__ = [
    "Manifest",
    "Model",
    "ModelpodError",
    "Pod",
    "PodRecord",
    "Settings",
    "Signature",
    "Store",
    "Tensor",
    "TensorSpec",
    "__version__",
    "load",
    "open_pod",
    "pack",
]
