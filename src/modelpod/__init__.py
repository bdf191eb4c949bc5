"""modelpod: model containers — pack, version, build and serve machine-learning models."""

from __future__ import annotations

__version__ = "0.1.0"

from modelpod.api import load, open_pod, pack  # noqa: E402
from modelpod.errors import ModelpodError  # noqa: E402
from modelpod.model import Model  # noqa: E402
from modelpod.pod import Manifest, Pod, Signature, TensorSpec  # noqa: E402
from modelpod.settings import Settings  # noqa: E402
from modelpod.store import PodRecord, Store  # noqa: E402

__all__ = [
    "Manifest",
    "Model",
    "ModelpodError",
    "Pod",
    "PodRecord",
    "Settings",
    "Signature",
    "Store",
    "TensorSpec",
    "__version__",
    "load",
    "open_pod",
    "pack",
]
