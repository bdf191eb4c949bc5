"""Ray Data ``map_batches`` over the same Parquet file, the same model (joblib), Parquet out.

Runs inside the benchmark's Ray venv. Prints JSON ``{"rows", "seconds", "rows_per_s"}``; the time
covers reading, predicting and writing (``ray.init`` is left out, as modelpod's start-up is).

Usage: python ray_batch.py MODEL.joblib IN.parquet OUT_DIR BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import joblib
import numpy as np
import ray

FEATURES = 20


class Predict:
    def __init__(self, path: str) -> None:
        self.model = joblib.load(path)

    def __call__(self, batch: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        x = np.stack([batch[f"f{i}"] for i in range(FEATURES)], axis=1).astype(np.float32)
        return {"id": batch["id"], "output-0": self.model.predict(x)}


def main(model: str, src: str, out: str, batch_size: int) -> None:
    # Logical CPUs only: the process is pinned to one core by taskset. With one logical CPU the
    # predicting actor would hold it and the read tasks would never be scheduled.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(src)
    ds = ds.map_batches(Predict, fn_constructor_args=(model,), batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    ds.write_parquet(out)
    seconds = time.perf_counter() - t0
    rows = ray.data.read_parquet(out).count()
    print(json.dumps({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
