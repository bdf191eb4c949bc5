"""Framework adapters: one small module per framework, each meeting the ``Adapter`` protocol.

Each module ``modelpod.frameworks.<name>`` defines (mypy checks every module against ``Adapter``):

- ``NAME``, ``EXTRA`` (the pip extra), ``IMPORTS`` (modules the extra provides, to check
  it is installed), ``DISTRIBUTIONS`` (the pip distributions to lock into the manifest) and
  ``TABLES`` (whether a table sample makes a table signature, the model then taking a DataFrame)
  and ``TAKES_TRUST`` (whether ``pack`` honours ``--trust``);
- ``detect(path) -> bool``: cheap, never imports the framework;
- ``pack(src, dest, request) -> Packed``: copy the model's files into the staging directory
  ``dest`` (under ``model/``), refuse unsafe formats, read the signature where the format carries it;
- ``load(pod) -> Model``: a ``Model`` (not yet loaded) for a verified pod.

This file holds the protocol, the registry and the records that cross between ``pack`` and the adapters.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from modelpod.errors import FrameworkError, MissingExtraError

if TYPE_CHECKING:
    from modelpod.model import Model
    from modelpod.pod import Pod

# Order matters for detection: the most specific formats first.
FRAMEWORKS = ("python", "transformers", "tensorflow", "onnx", "torch", "xgboost", "lightgbm", "sklearn")


@dataclass(frozen=True)
class PackRequest:
    """What the user asked ``pack`` for, as far as an adapter needs to know."""

    name: str
    allow_pickle: bool = False
    entrypoint: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    trust: tuple[str, ...] = ()  # --trust: types to trust beyond the format's defaults
    outputs: tuple[str, ...] = ()  # --outputs: named outputs in the adapter's words (label, probabilities, ...)


@dataclass(frozen=True)
class Packed:
    """What an adapter hands back to ``pack``."""

    signature: Any = None  # a modelpod.pod.Signature when the format carries one, else None
    options: Mapping[str, Any] = field(default_factory=dict)
    entrypoint: str | None = None
    roles: Mapping[str, str] = field(default_factory=dict)  # path prefix -> file role
    distributions: tuple[str, ...] = ()  # extra distributions to lock (beyond the adapter's own)
    serving: Mapping[str, Any] = field(default_factory=dict)
    trust: tuple[str, ...] = ()  # the requested --trust types the model needs (recorded in the manifest)


@runtime_checkable
class Adapter(Protocol):
    """The contract of a framework adapter module (constants read-only, three functions)."""

    @property
    def NAME(self) -> str: ...
    @property
    def EXTRA(self) -> str: ...
    @property
    def IMPORTS(self) -> tuple[str, ...]: ...
    @property
    def DISTRIBUTIONS(self) -> tuple[str, ...]: ...
    @property
    def TABLES(self) -> bool: ...
    @property
    def TAKES_TRUST(self) -> bool: ...

    def detect(self, path: Path) -> bool: ...

    def pack(self, src: Path, dest: Path, request: PackRequest) -> Packed: ...

    def load(self, pod: Pod) -> Model: ...


def module(name: str) -> Adapter:
    if name not in FRAMEWORKS:
        raise FrameworkError(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)}")
    # Checked statically below: every adapter module meets the protocol.
    return cast(Adapter, importlib.import_module(f"modelpod.frameworks.{name}"))


def require(name: str) -> Adapter:
    """The adapter module, after checking its extra is installed (one-line hint if not)."""
    mod = module(name)
    for imp in mod.IMPORTS:
        if importlib.util.find_spec(imp) is None:
            raise MissingExtraError(mod.EXTRA, imp, f"{name} models")
    return mod


def detect(path: Path) -> str:
    """The framework of a model file or directory, or a FrameworkError saying how to choose."""
    for name in FRAMEWORKS:
        if importlib.util.find_spec(f"modelpod.frameworks.{name}") is None:
            continue
        if module(name).detect(path):
            return name
    raise FrameworkError(
        f"cannot tell the framework of {path}; pass --framework ({', '.join(FRAMEWORKS)})"
    )


if TYPE_CHECKING:  # mypy checks each module against the protocol; nothing is imported at run time
    from modelpod.frameworks import lightgbm, onnx, python, sklearn, tensorflow, transformers, xgboost
    from modelpod.frameworks import torch as torch_adapter

    _python: Adapter = python
    _transformers: Adapter = transformers
    _tensorflow: Adapter = tensorflow
    _onnx: Adapter = onnx
    _torch: Adapter = torch_adapter
    _xgboost: Adapter = xgboost
    _lightgbm: Adapter = lightgbm
    _sklearn: Adapter = sklearn
