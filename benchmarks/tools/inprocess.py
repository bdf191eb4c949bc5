"""In-process predict throughput: the ceiling no server can beat (runs inside the workloads venv).

Calls the model directly, no HTTP, one thread, for a fixed time at each batch size, and prints
JSON `{"rss_mb_loaded": .., "batch_1": {"rows_per_s": .., "calls_per_s": ..}, "batch_32": {...}}`:
the process's RSS with the model loaded (the baseline servers' memory is compared with), then
rows/s at each batch size.

Usage: python inprocess.py WORKLOAD MODEL_DIR SECONDS
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np

BATCHES = (1, 32)


def load(workload: str, model_dir: Path) -> tuple[Callable[[np.ndarray], object], int]:
    if workload == "A":
        model = joblib.load(model_dir / "model.joblib")
        return model.predict, int(model.n_features_in_)
    import torch  # only here: workload A's process must not hold torch (its RSS is the baseline)

    torch.set_num_threads(1)
    module = torch.jit.load(str(model_dir / "model.pt")).eval()

    def predict(x: np.ndarray) -> object:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return predict, 512


def measure(predict: Callable[[np.ndarray], object], x: np.ndarray, seconds: float) -> dict[str, float]:
    for _ in range(20):
        predict(x)
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        predict(x)
        calls += 1
        now = time.perf_counter()
    elapsed = now - start
    return {"rows_per_s": calls * len(x) / elapsed, "calls_per_s": calls / elapsed}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(workload: str, model_dir: str, seconds: float) -> None:
    predict, features = load(workload, Path(model_dir))
    rng = np.random.default_rng(0)
    predict(rng.normal(size=(1, features)).astype(np.float32))
    # The memory of the model itself: this interpreter, its framework and the loaded model, one
    # predict done, no server. Servers are compared against it.
    result: dict[str, object] = {"rss_mb_loaded": rss_mb()}
    for batch in BATCHES:
        x = rng.normal(size=(batch, features)).astype(np.float32)
        result[f"batch_{batch}"] = measure(predict, x, seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
