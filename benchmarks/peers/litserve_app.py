"""LitServe: a LitAPI that reads the OIP v2 body; LitServe's own batching for workload B.

Run: python litserve_app.py  (with the BENCH_* environment set)
"""

# No `from __future__ import annotations`: LitServe hands decode_request's annotation to FastAPI
# as the body type, so it has to be a real class at runtime.
from typing import Any

import litserve as ls
import numpy as np
from oip_model import infer_response, load_predictor, to_array, workload_from_env
from pydantic import BaseModel

WORKLOAD = workload_from_env()


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


class OipAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = load_predictor(WORKLOAD.kind, WORKLOAD.model_dir)

    def decode_request(self, request: InferRequest) -> np.ndarray:
        return to_array(request.inputs[0].shape, request.inputs[0].data)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        # Each request holds a (1, features) block: join them into one (n, features) batch.
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return infer_response(WORKLOAD.model_name, output)


def main() -> None:
    api = OipAPI(
        max_batch_size=WORKLOAD.max_batch if WORKLOAD.batching else 1,
        batch_timeout=WORKLOAD.batch_wait_s if WORKLOAD.batching else 0.0,
        api_path=WORKLOAD.route,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host=WORKLOAD.host, port=WORKLOAD.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
