"""modelpod: model containers — pack, version, build and serve machine-learning models."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from modelpod.api import load, open_pod, pack
from modelpod.errors import ModelpodError
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


if TYPE_CHECKING:
    from modelpod.frameworks.python import Tensor


def __getattr__(name: str) -> Any:
    # Tensor comes with the custom-code adapter, imported on first use: a server of framework pods
    # (ONNX, scikit-learn, ...) never loads frameworks/python.py.
    if name == "Tensor":
        from modelpod.frameworks.python import Tensor

        return Tensor
    raise AttributeError(f"module 'modelpod' has no attribute {name!r}")
