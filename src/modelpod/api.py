"""The Python API's entry points: ``pack`` and ``load``, with the store taken from Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpod.errors import NotFoundError, UsageError
from modelpod.model import Model
from modelpod.pod import MANIFEST_NAME, Pod
from modelpod.settings import Settings
from modelpod.store import PodRecord, Store, directory_hint, is_path


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
    """A verified pod: a store reference, or a pod directory given as a ``Path`` or written as a
    path (``./lr``, ``/abs/lr``); a bare name is always looked up in the store."""
    if isinstance(ref, Path) or is_path(ref):
        p = Path(ref).expanduser()
        if not (p / MANIFEST_NAME).is_file():
            raise UsageError(f"{ref}: no pod directory there (no {MANIFEST_NAME})")
        return Pod.open(p, verify=verify)
    try:
        return _store(store, settings).open(ref, verify=verify)
    except NotFoundError as exc:
        raise NotFoundError(f"{exc}{directory_hint(ref)}") from None


def load(ref: str | Path, *, store: Store | None = None, settings: Settings | None = None) -> Model:
    """A loaded Model for a store reference (NAME, NAME:VERSION, NAME@ALIAS, NAME@sha256:...) or a
    pod directory (a ``Path``, or a string written as a path)."""
    from modelpod.trust.gate import load_model

    pod = open_pod(ref, store=store, settings=settings)
    model = load_model(pod, settings or Settings.from_env(), what=f"pod {ref}")
    if not model.loaded:
        model.load()
    return model
