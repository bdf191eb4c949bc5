"""Loading a model version as replica processes (``isolation: process``): the registry's other path.

The parent never imports the model: it keeps a ``RemoteModel`` (the signature, for the engine's
checks), a ``ReplicaSet`` as the batcher's worker, and the batcher itself. The launch (which
interpreter, which environment) comes from ``serving/launch.py``'s ``prepare``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from modelpod.serving import launch
from modelpod.serving.batcher import Batcher
from modelpod.serving.messages import Start
from modelpod.serving.metrics import ServingMetrics
from modelpod.serving.replica import RemoteModel, splitter
from modelpod.serving.replicas import ReplicaHooks, ReplicaSet
from modelpod.settings import Settings

if TYPE_CHECKING:
    from modelpod.serving.registry import ModelEntry


async def load_replicas(entry: ModelEntry, settings: Settings, metrics: ServingMetrics,
                        on_failed: Callable[[ReplicaSet, str], None]) -> tuple[RemoteModel, ReplicaSet, Batcher]:
    """Start ``entry``'s first replicas; returns once one serves (raises once the model failed)."""
    how = await launch.prepare(entry, settings)
    start = start_record(entry, settings)
    policy = entry.replica_policy
    replicas = ReplicaSet(entry.label, start, how, policy, entry.policy.timeout_s, entry.policy.max_batch_rows)
    model = replicas.model = RemoteModel(entry.name, entry.signature, splitter(entry.manifest))
    batcher = Batcher(replicas, entry.policy, entry.metrics, batchable=entry.batchable, slots=replicas.slots)
    name, version = entry.metrics.key
    replicas.hooks = ReplicaHooks(
        on_failed=lambda reason: on_failed(replicas, reason),
        on_scale=lambda direction: metrics.scale_events.labels(name, version, direction).inc(),
        on_restart=lambda reason: metrics.replica_restarts.labels(name, version, reason).inc(),
        queued_rows=lambda: batcher.queued_rows,
        wake=batcher.wake,
    )
    try:
        await replicas.start()
    except BaseException:
        replicas.close()
        await replicas.wait_closed()
        raise
    return model, replicas, batcher


def start_record(entry: ModelEntry, settings: Settings) -> Start:
    """What ``entry``'s replicas (and their template) load."""
    src = entry.source
    return Start(entry.label, str(settings.home), ref=src.ref, path=str(src.path) if src.path is not None else None)


def start_early(entries: Iterable[ModelEntry], settings: Settings) -> None:
    """Fork the templates of the models that will load into replicas of the server's own environment,
    now (``modelpod serve``, before the event loop starts): see ``forking.start_early``."""
    from modelpod.serving.forking import start_early as fork_early

    if settings.lazy_load:
        return
    for entry in entries:
        own_env = entry.env is not None and entry.env.own
        if entry.replica_policy.process and entry.available and entry.source.model is None and not own_env:
            fork_early(start_record(entry, settings), entry.label, entry.replica_policy.max)
