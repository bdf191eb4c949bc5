"""Models and a server factory for the traffic (routes) tests: each model answers with its own tag."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
from servutil import LiveServer

from modelpod.model import Batch, Model
from modelpod.pod import Signature, TensorSpec
from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

SIG = Signature((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 2)),))
LABEL_SIG = Signature((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("label", "INT64", (-1,)),))


class Offset(Model):
    """y = x + offset: which variant answered shows in the numbers."""

    signature = SIG

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset
        self.calls = 0

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        self.calls += 1
        return {"y": np.asarray(inputs["x"], dtype=np.float32) + np.float32(self.offset)}


class Reverse(Offset):
    """y = x with its columns swapped: another argmax than Offset's for rows with x0 != x1."""

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        return {"y": np.ascontiguousarray(np.asarray(inputs["x"], dtype=np.float32)[:, ::-1])}


class Failing(Offset):
    """Raises on every batch."""

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        raise RuntimeError("this version is broken")


class Slow(Offset):
    def __init__(self, offset: float = 0.0, delay: float = 0.05) -> None:
        super().__init__(offset)
        self.delay = delay

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        time.sleep(self.delay)
        return super().predict(inputs)


class Labeller(Model):
    """label = 1 when x[:, 0] > threshold."""

    signature = LABEL_SIG

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        return {"label": (np.asarray(inputs["x"])[:, 0] > self.threshold).astype(np.int64)}


def body(x: float = 1.0, rows: int = 1, **extra: Any) -> dict[str, Any]:
    data = [x, x] * rows
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": data}], **extra}


@contextmanager
def route_server(models: Mapping[str, Model], routes: Mapping[str, Any] | None = None,
                 settings: Settings | None = None, grpc: bool = False,
                 policy: BatchPolicy | None = None) -> Iterator[LiveServer]:
    """A live server with these models (``"name:version"`` keys) and the config file's ``routes``."""
    settings = settings or Settings()

    def setup(engine: InferenceEngine) -> None:
        engine.config = ServeConfig.from_settings(settings, {"routes": dict(routes or {})})
        for ref, model in models.items():
            name, _, version = ref.partition(":")
            engine.add_model(model, name=name, version=int(version) if version else None,
                             policy=policy or BatchPolicy(max_batch_rows=16, max_batch_wait_ms=0.5))

    with LiveServer(settings, setup, grpc=grpc) as live:
        yield live


def variants_of(client: httpx.Client, path: str, n: int, make: Callable[[int], dict[str, Any]] | None = None,
                headers: Callable[[int], dict[str, str]] | None = None) -> list[str]:
    """POST ``n`` requests; the ``modelpod-variant`` header of each answer (all must be 200)."""
    out = []
    for i in range(n):
        r = client.post(path, json=make(i) if make else body(), headers=headers(i) if headers else None)
        assert r.status_code == 200, r.text
        out.append(r.headers["modelpod-variant"])
    return out
