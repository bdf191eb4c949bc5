"""Paths, pinned peer versions and the load plan shared by the harness modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
VENVS_DIR = WORK_DIR / "venvs"
MODELS_DIR = WORK_DIR / "models"
LOGS_DIR = WORK_DIR / "logs"
RUNTIME_DIR = WORK_DIR / "runtime"
RESULTS_PATH = WORK_DIR / "results.json"
PEERS_DIR = BENCH_DIR / "peers"
TOOLS_DIR = BENCH_DIR / "tools"
LUA_SCRIPT = BENCH_DIR / "post.lua"

# The only torch spec allowed: a local CPU wheel. Any other spec pulls in the CUDA stack.
TORCH_SPEC = "torch==2.13.0"
SKLEARN_SPEC = "scikit-learn==1.9.1"

SERVER_CPU = "0"
LOADGEN_CPU = "1"
CONCURRENCIES = (1, 8, 64)
COLD_STARTS = 3  # launches per server; the cold start reported is their median
MAX_BATCH_ROWS = 32
MAX_BATCH_WAIT_MS = 5.0


@dataclass(frozen=True)
class EnvSpec:
    """One virtualenv: what goes in it, installed in this order (torch first when needed)."""

    name: str
    needs_torch: bool
    requirements: tuple[str, ...]

    @property
    def path(self) -> Path:
        return VENVS_DIR / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


# Model tooling (make the models, measure in-process throughput) lives in its own venv.
WORKLOADS_ENV = EnvSpec(
    "workloads", True, (SKLEARN_SPEC, "skops==0.16.0", "joblib", "numpy", "skl2onnx==1.20.0", "onnx==1.23.2")
)

PEER_ENVS: dict[str, EnvSpec] = {
    "fastapi": EnvSpec(
        "fastapi", True, (SKLEARN_SPEC, "joblib", "fastapi==0.165.0", "uvicorn[standard]==0.54.0")
    ),
    "litserve": EnvSpec("litserve", True, (SKLEARN_SPEC, "joblib", "litserve==0.2.19")),
    # uvloop>=0.22 breaks MLServer 1.7.1's inference workers (SeldonIO/MLServer#2286, fix unreleased).
    "mlserver": EnvSpec(
        "mlserver",
        True,
        (SKLEARN_SPEC, "joblib", "mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"),
    ),
    "bentoml": EnvSpec("bentoml", True, (SKLEARN_SPEC, "joblib", "bentoml==1.4.39")),
    "ray": EnvSpec("ray", True, (SKLEARN_SPEC, "joblib", "ray[serve]==2.60.0")),
}

# perf_analyzer ships as a binary inside this wheel; it links against libcudart even on CPU.
PERF_ENV = EnvSpec("perf_analyzer", False, ("tritonclient==2.51.0", "nvidia-cuda-runtime-cu12"))

ALL_PEERS = tuple(PEER_ENVS)
ALL_WORKLOADS = ("A", "B")


@dataclass(frozen=True)
class Durations:
    """Seconds per wrk point and the deadlines used while polling."""

    load_s: int
    warmup_s: int
    inprocess_s: float
    cold_start_deadline_s: float = 180.0
    install_deadline_s: float = 1800.0
