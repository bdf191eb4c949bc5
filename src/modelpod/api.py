"""The Python API's entry points: ``pack`` and ``load``, with the store taken from Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpod.frameworks import require
from modelpod.model import Model
from modelpod.pod import MANIFEST_NAME, Pod
from modelpod.settings import Settings
from modelpod.store import PodRecord, Store


def _store(store: Store | None, settings: Settings | None) -> Store:
    if store is not None:
        return store
    return Store((settings or Settings.from_env()).home)


def pack(path: str | Path, name: str, *, store: Store | None = None, settings: Settings | None = None,
         **kwargs: Any) -> PodRecord:
    """Pack a model into the store; see ``modelpod.packing.pack`` for the options."""
    from modelpod.packing import pack as _pack

    return _pack(path, name, _store(store, settings), **kwargs)


def open_pod(ref: str | Path, *, store: Store | None = None, settings: Settings | None = None,
             verify: bool = True) -> Pod:
    """A verified pod: a directory holding modelpod.yaml, or a store reference."""
    p = Path(ref)
    if (p / MANIFEST_NAME).is_file():
        return Pod.open(p, verify=verify)
    return _store(store, settings).open(str(ref), verify=verify)


def load(ref: str | Path, *, store: Store | None = None, settings: Settings | None = None) -> Model:
    """A loaded Model for a pod reference (NAME, NAME:VERSION, NAME@ALIAS, digest or directory)."""
    pod = open_pod(ref, store=store, settings=settings)
    model: Model = require(pod.manifest.framework).load(pod)
    model.load()
    return model
