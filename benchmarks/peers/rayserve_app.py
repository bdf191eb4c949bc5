"""Ray Serve: one deployment on a local one-CPU Ray cluster; `@serve.batch` for workload B.

Run: python rayserve_app.py  (BENCH_* environment set). Stays up until SIGTERM/SIGINT, then
shuts Serve and the Ray processes it started down.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import ray
from oip_model import first_input, infer_response, load_predictor, split_rows, workload_from_env
from ray import serve
from starlette.requests import Request

WORKLOAD = workload_from_env()


@serve.deployment(max_ongoing_requests=2 * WORKLOAD.max_batch)
class OipDeployment:
    def __init__(self, kind: str, model_dir: str, model_name: str, batching: bool) -> None:
        self.model = load_predictor(kind, Path(model_dir))
        self.model_name = model_name
        self.batching = batching

    @serve.batch(max_batch_size=WORKLOAD.max_batch, batch_wait_timeout_s=WORKLOAD.batch_wait_s)
    async def predict_batch(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        y = self.model(np.concatenate(blocks))
        return split_rows(y, [len(b) for b in blocks])

    async def __call__(self, request: Request) -> dict[str, Any]:
        x = first_input(await request.json())
        y = await self.predict_batch(x) if self.batching else self.model(x)
        return infer_response(self.model_name, y)


def main() -> None:
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=128 * 1024 * 1024)
    serve.start(http_options={"host": WORKLOAD.host, "port": WORKLOAD.port})
    app = OipDeployment.bind(WORKLOAD.kind, str(WORKLOAD.model_dir), WORKLOAD.model_name, WORKLOAD.batching)
    serve.run(
        app,
        name=WORKLOAD.model_name,
        route_prefix=WORKLOAD.route,
        logging_config={"enable_access_log": False},
    )
    # Handlers only now: Ray's own processes, started above, keep the default signal behaviour.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print("rayserve: ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
