"""BentoML services taking the OIP v2 body: `LogReg` (workload A) and `Mlp` (B, adaptive batching).

Run: bentoml serve bentoml_service:LogReg --host 127.0.0.1 --port PORT  (BENCH_* environment set)

BentoML maps top-level JSON fields to parameters, so the body's `inputs` list arrives as the
`inputs` argument. With `batchable=True` BentoML concatenates the `inputs` lists of concurrent
requests and splits the returned list back, one entry per tensor; each request sends one tensor,
so the response body is the list of that request's output tensors.
"""

from __future__ import annotations

from typing import Any

import bentoml
import numpy as np
from oip_model import (
    infer_response,
    load_predictor,
    output_tensor,
    split_rows,
    to_array,
    workload_from_env,
)
from pydantic import BaseModel

WORKLOAD = workload_from_env()


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


@bentoml.service(workers=1)
class LogReg:
    def __init__(self) -> None:
        self.model = load_predictor("A", WORKLOAD.model_dir)

    @bentoml.api(route="/v2/models/logreg/infer")
    def infer(self, inputs: list[Tensor]) -> dict[str, Any]:
        x = to_array(inputs[0].shape, inputs[0].data)
        return infer_response("logreg", self.model(x))


@bentoml.service(workers=1)
class Mlp:
    def __init__(self) -> None:
        self.model = load_predictor("B", WORKLOAD.model_dir)

    @bentoml.api(route="/v2/models/mlp/infer", batchable=True, max_batch_size=WORKLOAD.max_batch)
    def infer(self, inputs: list[Tensor]) -> list[dict[str, Any]]:
        blocks = [to_array(t.shape, t.data) for t in inputs]
        y = self.model(np.concatenate(blocks))
        return [output_tensor(part) for part in split_rows(y, [len(b) for b in blocks])]
