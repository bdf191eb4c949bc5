"""The two workloads: made from synthetic data by tools/make_models.py, measured in-process by
tools/inprocess.py, both run inside the workloads venv."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MODELS_DIR, SERVER_CPU, TOOLS_DIR

MODEL_NAMES = {"A": "logreg", "B": "mlp"}
MODELPOD_FILES = {"A": "model.skops", "B": "model.pt"}
# Batching for the peers: on for the MLP (B), where it pays; off for the 20-feature logistic
# regression (A), where each peer's default is unbatched. modelpod batches both by design.
PEER_BATCHING = {"A": False, "B": True}


class WorkloadError(RuntimeError):
    """The models could not be made or measured."""


@dataclass(frozen=True)
class Workload:
    key: str
    model_name: str
    model_dir: Path
    features: int
    expected: tuple[float, ...]
    output_datatype: str
    peer_batching: bool

    @property
    def route(self) -> str:
        return f"/v2/models/{self.model_name}/infer"

    @property
    def body_path(self) -> Path:
        return self.model_dir / "body.json"

    @property
    def sample_path(self) -> Path:
        return self.model_dir / "sample.npy"

    @property
    def modelpod_file(self) -> Path:
        return self.model_dir / MODELPOD_FILES[self.key]

    @property
    def onnx_file(self) -> Path:
        """The same model as ONNX (workload A only): the small pod whose cold start is measured."""
        return self.model_dir / "model.onnx"

    @property
    def onnx_body_path(self) -> Path:
        return self.model_dir / "onnx_body.json"


def _run_tool(python: Path, args: list[str], timeout_s: float) -> str:
    cmd = ["taskset", "-c", SERVER_CPU, str(python), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as every server gets
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WorkloadError(f"timed out after {timeout_s:.0f}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise WorkloadError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def make_models(python: Path) -> dict[str, Workload]:
    """(Re)make both models; cheap, and keeps every file in step with the tool's code."""
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    _run_tool(python, [str(TOOLS_DIR / "make_models.py"), str(MODELS_DIR)], timeout_s=600)
    meta = json.loads((MODELS_DIR / "meta.json").read_text())
    return {
        key: Workload(
            key=key,
            model_name=MODEL_NAMES[key],
            model_dir=MODELS_DIR / key,
            features=int(info["features"]),
            expected=tuple(float(v) for v in info["expected"]),
            output_datatype=info["datatype"],
            peer_batching=PEER_BATCHING[key],
        )
        for key, info in meta.items()
    }


def measure_inprocess(python: Path, workload: Workload, seconds: float) -> dict[str, Any]:
    """Rows/s of direct predict calls at batch 1 and batch 32, on the server's core."""
    args = [str(TOOLS_DIR / "inprocess.py"), workload.key, str(workload.model_dir), str(seconds)]
    out = _run_tool(python, args, timeout_s=4 * seconds + 300)
    return dict(json.loads(out.strip().splitlines()[-1]))


def _numbers(node: Any) -> list[float]:
    """Every value under a `data` key, flattened, wherever the peer put its output tensor(s)."""
    if isinstance(node, dict):
        found: list[float] = []
        for key, value in node.items():
            if key == "data" and isinstance(value, list):
                found.extend(_flatten(value))
            else:
                found.extend(_numbers(value))
        return found
    if isinstance(node, list):
        return [v for item in node for v in _numbers(item)]
    return []


def _flatten(values: list[Any]) -> list[float]:
    out: list[float] = []
    for value in values:
        if isinstance(value, list):
            out.extend(_flatten(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
    return out


def check_prediction(workload: Workload, response: Any) -> str:
    """'ok' when the answer holds the expected prediction, else a short reason (recorded, not fatal)."""
    got = _numbers(response)
    want = workload.expected
    if len(got) != len(want):
        return f"mismatch: expected {len(want)} values, got {len(got)}"
    worst = max((abs(g - w) - 1e-4 * abs(w) for g, w in zip(got, want, strict=True)), default=0.0)
    return "ok" if worst <= 1e-4 else f"mismatch: largest difference {worst:.3g}"
