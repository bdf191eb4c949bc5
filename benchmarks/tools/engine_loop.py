"""The engine's request path in-process, no HTTP: a fixed number of requests for one target.

Run under ``valgrind --tool=callgrind`` twice with two request counts; the difference in counted
instructions over the difference in requests is the cost of one request, stable where wall time
on a shared machine is not. Targets: ``direct`` (a version by number), ``routed`` (a route with one
variant at weight 100: the routing decision alone), ``split`` (a 90/10 route over two versions).
The model adds one to its input: what is measured is the serving path, not a framework.

Usage: python engine_loop.py TARGET GATHERS    (GATHERS rounds of 64 concurrent requests)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from modelpod.model import Batch, Model
from modelpod.pod import Signature, TensorSpec
from modelpod.protocols.codec import decode_request
from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

CONCURRENCY = 64
TARGETS = {"direct": ("m", "1"), "routed": ("one", None), "split": ("split", None)}
ROUTES = {
    "split": {"variants": [{"model": "m:1", "weight": 90}, {"model": "m:2", "weight": 10}]},
    "one": {"variants": [{"model": "m:1", "weight": 100}]},
}


class AddOne(Model):
    signature = Signature((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 2)),))

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        return {"y": np.asarray(inputs["x"], dtype=np.float32) + np.float32(1)}


async def run(target: str, gathers: int) -> None:
    settings = Settings()
    engine = InferenceEngine(settings)
    engine.config = ServeConfig.from_settings(settings, {"routes": ROUTES})
    for version in (1, 2):
        engine.add_model(AddOne(), name="m", version=version,
                         policy=BatchPolicy(max_batch_rows=32, max_batch_wait_ms=5))
    await engine.start()
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}
    name, version = TARGETS[target]

    async def one() -> None:
        request = decode_request(body, None, engine.input_check(name, version))
        await engine.infer(name, version, request)

    for _ in range(gathers):
        await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
    await engine.close()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], int(sys.argv[2])))
