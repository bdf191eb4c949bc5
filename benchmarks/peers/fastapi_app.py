"""Bare FastAPI + uvicorn baseline: one pydantic-validated OIP v2 route, no batching.

Run: uvicorn fastapi_app:app --host 127.0.0.1 --port PORT  (with the BENCH_* environment set)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from oip_model import first_input, infer_response, load_predictor, workload_from_env
from pydantic import BaseModel

WORKLOAD = workload_from_env()
PREDICT = load_predictor(WORKLOAD.kind, WORKLOAD.model_dir)

app = FastAPI()


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


@app.get("/v2/health/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


@app.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: InferRequest) -> dict[str, Any]:
    if model_name != WORKLOAD.model_name:
        raise HTTPException(status_code=404, detail=f"unknown model {model_name}")
    # The model call is short and CPU-bound, so it runs inline on the event loop.
    x = first_input(request.model_dump())
    return infer_response(WORKLOAD.model_name, PREDICT(x))
