"""What the console's JSON endpoints say: the server, its models and routes, an example request per
model for the try-it form, and the optional sections other rooms provide.

Sections: ``engine.console_sections`` maps a name (``drift``, ``replicas``, ...) to a callable that
returns one JSON-ready table, ``{"title": str, "columns": [str, ...], "rows": [[cell, ...], ...]}``
(optionally ``"note": str``); the page renders each section the engine has and nothing otherwise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelpod import __version__
from modelpod.errors import NotFoundError
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.registry import ModelEntry

IMAGE_TASKS = ("detect", "classify")
SAMPLE_NAME = "sample.json"  # modelpod.probe.SAMPLE_NAME (not imported: probe pulls in subprocess machinery)
_SAMPLE_BYTES = 4 * 1024 * 1024


def overview(engine: InferenceEngine, started: float) -> dict[str, Any]:
    """The server, every model version (served or only in the store) and every route."""
    models = [model_row(e) for e in engine.registry]
    served = {(m["name"], m["version"]) for m in models}
    store = engine.registry.store()
    if store is not None:
        try:
            records = store.list()
        except Exception:  # the page keeps showing what is served when the store cannot be read
            records = []
        for rec in records:
            if (rec.name, str(rec.version)) not in served:
                models.append({"name": rec.name, "version": str(rec.version), "label": f"{rec.name}:{rec.version}",
                               "state": "UNAVAILABLE", "reason": "in the store, not loaded", "served": False,
                               "aliases": sorted(rec.aliases)})
    models.sort(key=lambda m: (m["name"], int(m["version"]) if str(m["version"]).isdigit() else -1))
    routes = [route.describe() for route in engine.traffic.routes.values()]
    return {
        "server": {"name": "modelpod", "version": __version__, "live": engine.live(), "ready": engine.ready(),
                   "draining": engine.draining, "started": round(started, 3),
                   "uptime_s": round(time.time() - started, 3), "pid": os.getpid()},
        "models": models,
        "routes": routes,
        "sections": sorted(getattr(engine, "console_sections", None) or {}),
    }


def model_row(e: ModelEntry) -> dict[str, Any]:
    sig = e.signature
    batcher = e.batcher
    return {
        "name": e.name, "version": e.version_text, "label": e.label, "state": e.state.value, "reason": e.reason,
        "served": True, "available": e.available, "platform": e.platform, "aliases": sorted(e.aliases),
        "digest": e.manifest.digest if e.manifest is not None else None,
        "task": sig.parameters.get("task"), "table": sig.is_table,
        "inputs": [t.to_dict() for t in sig.inputs], "outputs": [t.to_dict() for t in sig.outputs],
        "memory_bytes": e.memory_bytes, "load_seconds": round(e.load_seconds, 4),
        "batching": {"max_batch_rows": e.policy.max_batch_rows, "max_batch_wait_ms": e.policy.max_batch_wait_ms},
        "queue_depth": batcher.queue_depth if batcher is not None else 0,
        "inflight": batcher.inflight if batcher is not None else 0,
    }


def sections(engine: InferenceEngine) -> dict[str, Any]:
    """Each provided section's table; a provider that fails shows its error instead."""
    out: dict[str, Any] = {}
    for name, provide in sorted((getattr(engine, "console_sections", None) or {}).items()):
        try:
            out[name] = provide()
        except Exception as exc:
            out[name] = {"title": name, "error": f"{type(exc).__name__}: {exc}", "columns": [], "rows": []}
    return out


def example(engine: InferenceEngine, name: str, version: str | None) -> dict[str, Any]:
    """An OIP v2 request for ``name`` to start the try-it form from: the first row of the pod's pack
    sample when it has one, else one row made from the signature (zeros, empty strings)."""
    entry = engine.resolve(name, version)
    sig = entry.signature
    task = sig.parameters.get("task")
    kind = "image" if task in IMAGE_TASKS else ("table" if sig.is_table else "tensor")
    out: dict[str, Any] = {"model": name, "resolved": entry.label, "kind": kind, "task": task,
                           "inputs": [t.to_dict() for t in sig.inputs], "outputs": [t.to_dict() for t in sig.outputs],
                           "parameters": dict(sig.parameters)}
    if kind == "image":
        spec = sig.inputs[0]
        out["source"] = "upload"
        out["request"] = {"inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": [1], "data": ["<image>"]}],
                          "parameters": {"annotate": True} if task == "detect" else {}}
        return out
    request = _sample_request(entry)
    out["source"] = "sample" if request is not None else "signature"
    out["request"] = request if request is not None else _signature_request(entry)
    return out


def _pod_dir(entry: ModelEntry) -> Path | None:
    pod = getattr(entry.model, "pod", None) if entry.model is not None else None
    if pod is not None:
        return Path(pod.path)
    return entry.source.path


def _sample_request(entry: ModelEntry) -> dict[str, Any] | None:
    """The pod's ``sample.json`` cut to its first row, or None."""
    directory = _pod_dir(entry)
    if directory is None or entry.manifest is None or not any(f.path == SAMPLE_NAME for f in entry.manifest.files):
        return None
    path = directory / SAMPLE_NAME
    try:
        if path.stat().st_size > _SAMPLE_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, list):
        return None
    return {"inputs": [_first_row(t) for t in inputs if isinstance(t, dict)]}


def _first_row(tensor: dict[str, Any]) -> dict[str, Any]:
    shape = tensor.get("shape")
    data = tensor.get("data")
    if not (isinstance(shape, list) and shape and isinstance(data, list) and all(isinstance(d, int) for d in shape)):
        return tensor
    if shape[0] <= 1:
        return tensor
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return {**tensor, "shape": [1, *shape[1:]], "data": data[:per_row]}


def _signature_request(entry: ModelEntry) -> dict[str, Any]:
    inputs = []
    for spec in entry.signature.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        n = int(np.prod(shape)) if shape else 1
        fill: Any = "" if spec.datatype == "BYTES" else (False if spec.datatype == "BOOL" else 0)
        inputs.append({"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": [fill] * n})
    return {"inputs": inputs}


def report(engine: InferenceEngine, route: str) -> dict[str, Any]:
    """A route's A/B report (``GET /v2/routes/{r}/report``'s body)."""
    if route not in engine.traffic.routes:
        raise NotFoundError(f"no route {route!r}")
    return engine.traffic.report(route)
