"""The REST handler's request path in-process, no sockets: a fixed number of inference requests.

What `modelpod serve` does for one request between the HTTP parser and the socket write: route,
token check, JSON decode and input check, the engine (batching, metrics), the model, the answer's
encoding. Run under ``valgrind --tool=callgrind`` with two request counts and take the difference
(instructions per request, stable on a busy machine), or with ``--profile`` for cProfile's table.
The model adds one to its input: what is measured is the serving path, not a framework.

Usage: python rest_loop.py FEATURES GATHERS [--profile]   (GATHERS rounds of 64 concurrent requests)
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from modelpod.model import Batch, Model
from modelpod.pod import Signature, TensorSpec
from modelpod.protocols.rest import RestApp

try:
    from modelpod.protocols.wire import Request
except ImportError:  # revisions before protocols/wire.py (an A/B against an older commit)
    from modelpod.protocols.http import Request
from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

CONCURRENCY = 64
TOKEN = "bench-token"


def add_one(features: int) -> Model:
    class AddOne(Model):
        signature = Signature((TensorSpec("input-0", "FP32", (-1, features)),),
                              (TensorSpec("output-0", "FP32", (-1, features)),))

        def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
            return {"output-0": inputs["input-0"][:, :10] + np.float32(1)}

    return AddOne()


async def run(features: int, gathers: int) -> None:
    settings = Settings(token=TOKEN)
    engine = InferenceEngine(settings)
    engine.add_model(add_one(features), name="m", version=1,
                     policy=BatchPolicy(max_batch_rows=32, max_batch_wait_ms=5))
    await engine.start()
    app = RestApp(engine, settings)
    rng = np.random.default_rng(0)
    data = [round(float(v), 6) for v in rng.standard_normal(features)]
    body = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, features], "datatype": "FP32", "data": data}]})

    async def one() -> None:
        headers = {"host": "127.0.0.1:8080", "content-type": "application/json",
                   "authorization": f"Bearer {TOKEN}", "content-length": str(len(body))}
        request = Request("POST", "/v2/models/m/infer", "", headers, body, True, time.perf_counter())
        response = await app(request)
        assert response.status == 200, response.body

    for _ in range(gathers):
        await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
    await engine.close()


def _loop_policy() -> None:
    try:
        import uvloop  # what `modelpod serve` runs on when it is installed
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    _loop_policy()
    features, gathers = int(sys.argv[1]), int(sys.argv[2])
    if "--profile" in sys.argv:
        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, run(features, gathers))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
    else:
        asyncio.run(run(features, gathers))
