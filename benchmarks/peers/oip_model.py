"""What every peer service shares: which model to load, and the OIP v2 JSON tensor <-> numpy glue.

The harness passes the workload in environment variables (this file runs inside each peer's venv):
BENCH_WORKLOAD (A or B), BENCH_MODEL_NAME, BENCH_MODEL_DIR, BENCH_BATCHING (1/0),
BENCH_MAX_BATCH, BENCH_BATCH_WAIT_S, BENCH_HOST, BENCH_PORT.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Workload:
    kind: str
    model_name: str
    model_dir: Path
    batching: bool
    max_batch: int
    batch_wait_s: float
    host: str
    port: int

    @property
    def route(self) -> str:
        return f"/v2/models/{self.model_name}/infer"


def workload_from_env() -> Workload:
    env = os.environ
    return Workload(
        kind=env["BENCH_WORKLOAD"],
        model_name=env["BENCH_MODEL_NAME"],
        model_dir=Path(env["BENCH_MODEL_DIR"]),
        batching=env.get("BENCH_BATCHING", "0") == "1",
        max_batch=int(env.get("BENCH_MAX_BATCH", "32")),
        batch_wait_s=float(env.get("BENCH_BATCH_WAIT_S", "0.005")),
        host=env.get("BENCH_HOST", "127.0.0.1"),
        port=int(env.get("BENCH_PORT", "8000")),
    )


def load_predictor(kind: str, model_dir: Path) -> Predictor:
    """A: the joblib LogisticRegression (labels out); B: the TorchScript MLP (logits out)."""
    if kind == "A":
        import joblib

        estimator = joblib.load(model_dir / "model.joblib")
        return lambda x: np.asarray(estimator.predict(x), dtype=np.int64)

    import torch

    torch.set_num_threads(1)
    module = torch.jit.load(str(model_dir / "model.pt")).eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return predict


def to_array(shape: Sequence[int], data: Sequence[float]) -> np.ndarray:
    """A flat OIP `data` list as a float32 batch of rows."""
    return np.asarray(data, dtype=np.float32).reshape(shape)


def first_input(body: dict[str, Any]) -> np.ndarray:
    tensor = body["inputs"][0]
    return to_array(tensor["shape"], tensor["data"])


def output_tensor(y: np.ndarray) -> dict[str, Any]:
    datatype = "INT64" if y.dtype.kind in "iu" else "FP32"
    return {"name": "output-0", "shape": list(y.shape), "datatype": datatype, "data": y.ravel().tolist()}


def infer_response(model_name: str, y: np.ndarray) -> dict[str, Any]:
    return {"model_name": model_name, "outputs": [output_tensor(y)]}


def split_rows(y: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Cut a batched result back into one piece per request, by the rows each request sent."""
    bounds = np.cumsum(counts)[:-1]
    return list(np.split(y, bounds))
