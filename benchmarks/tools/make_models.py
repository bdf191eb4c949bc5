"""Make the two benchmark models from synthetic data (runs inside the workloads venv).

A: scikit-learn LogisticRegression on 20 features, saved with joblib (peers) and skops (modelpod),
   and converted to ONNX (the small pod whose cold start is measured on its own).
B: a 512-2048-2048-10 MLP, TorchScript (everyone loads the same file).
For each workload it also writes a sample batch (.npy, for `modelpod pack --sample`), the OIP v2
request body the load generator posts, and the prediction that body must produce.

Usage: python make_models.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import skl2onnx
import skops.io
import torch
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

SEED = 20261122
A_FEATURES = 20
B_SIZES = (512, 2048, 2048, 10)


def oip_body(row: np.ndarray) -> dict[str, Any]:
    """One-row OIP v2 request; floats rounded so the body is short and parses to the same float32."""
    data = [round(float(v), 6) for v in row.ravel()]
    return {"inputs": [{"name": "input-0", "shape": [1, row.size], "datatype": "FP32", "data": data}]}


def make_a(out: Path, rng: np.random.Generator) -> dict[str, Any]:
    x = rng.normal(size=(4000, A_FEATURES)).astype(np.float32)
    w = rng.normal(size=A_FEATURES)
    y = (x @ w + 0.5 * rng.normal(size=len(x)) > 0).astype(np.int64)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    joblib.dump(model, out / "model.joblib")
    skops.io.dump(model, out / "model.skops")
    # The same model as ONNX, its input named as in the request body, plain tensors out (no zipmap).
    onnx_model = skl2onnx.to_onnx(model, initial_types=[("input-0", FloatTensorType([None, A_FEATURES]))],
                                  options={id(model): {"zipmap": False}}, target_opset=17)
    (out / "model.onnx").write_bytes(onnx_model.SerializeToString())
    onnx_body = oip_body(x[2:3])
    onnx_body["inputs"][0]["name"] = onnx_model.graph.input[0].name  # skl2onnx writes input_0
    (out / "onnx_body.json").write_text(json.dumps(onnx_body, separators=(",", ":")))
    np.save(out / "sample.npy", x[:2])
    row = np.asarray(oip_body(x[2:3])["inputs"][0]["data"], dtype=np.float32).reshape(1, -1)
    return {"body": oip_body(row), "expected": model.predict(row).tolist(), "datatype": "INT64"}


def make_b(out: Path, rng: np.random.Generator) -> dict[str, Any]:
    torch.manual_seed(SEED)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(B_SIZES, B_SIZES[1:], strict=False)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(B_SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).eval()
    torch.jit.script(model).save(str(out / "model.pt"))
    x = rng.normal(size=(3, B_SIZES[0])).astype(np.float32)
    np.save(out / "sample.npy", x[:2])
    row = np.asarray(oip_body(x[2:3])["inputs"][0]["data"], dtype=np.float32).reshape(1, -1)
    with torch.inference_mode():
        expected = model(torch.from_numpy(row)).numpy().ravel().tolist()
    return {"body": oip_body(row), "expected": expected, "datatype": "FP32"}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    meta: dict[str, Any] = {}
    for name, maker, features in (("A", make_a, A_FEATURES), ("B", make_b, B_SIZES[0])):
        out = Path(out_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        info = maker(out, rng)
        (out / "body.json").write_text(json.dumps(info.pop("body"), separators=(",", ":")))
        meta[name] = {"features": features, **info}
    (Path(out_dir) / "meta.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
