"""How to start each peer's service for a workload: command, environment, working directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import MAX_BATCH_ROWS, MAX_BATCH_WAIT_MS, PEER_ENVS, PEERS_DIR, RUNTIME_DIR
from .procs import free_port
from .workloads import Workload

# Peer names as printed in the table.
DISPLAY = {
    "fastapi": "FastAPI+uvicorn",
    "litserve": "LitServe",
    "mlserver": "MLServer",
    "bentoml": "BentoML",
    "ray": "Ray Serve",
    "modelpod": "modelpod",
    "http-floor": "HTTP floor (uvloop+httptools)",
}
# The distributions whose versions the results file records, per venv.
VERSION_KEYS = {
    "fastapi": ("fastapi", "uvicorn"),
    "litserve": ("litserve", "fastapi", "uvicorn"),
    "mlserver": ("mlserver", "mlserver-sklearn"),
    "bentoml": ("bentoml",),
    "ray": ("ray",),
}
COMMON_VERSION_KEYS = ("torch", "scikit-learn", "numpy")


@dataclass(frozen=True)
class LaunchSpec:
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    # Headers every client sends this server (modelpod runs with auth on: a bearer token).
    headers: dict[str, str] = field(default_factory=dict)


def base_env(venv: Path | None, extra: dict[str, str]) -> dict[str, str]:
    """The environment every server gets: one math thread, unbuffered output, its venv first."""
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "*",
        }
    )
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def workload_env(workload: Workload, port: int) -> dict[str, str]:
    return {
        "BENCH_WORKLOAD": workload.key,
        "BENCH_MODEL_NAME": workload.model_name,
        "BENCH_MODEL_DIR": str(workload.model_dir),
        "BENCH_BATCHING": "1" if workload.peer_batching else "0",
        "BENCH_MAX_BATCH": str(MAX_BATCH_ROWS),
        "BENCH_BATCH_WAIT_S": str(MAX_BATCH_WAIT_MS / 1000),
        "BENCH_HOST": "127.0.0.1",
        "BENCH_PORT": str(port),
        "PYTHONPATH": str(PEERS_DIR),
    }


def _mlserver_repo(workload: Workload, port: int) -> Path:
    """A model repository with settings.json (ports, no debug logging) and one model-settings.json."""
    root = RUNTIME_DIR / "mlserver" / workload.key
    model_dir = root / workload.model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "metrics_dir": str(root / ".metrics"),
        "environments_dir": str(root / ".envs"),
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    if workload.key == "A":
        model: dict[str, object] = {
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(workload.model_dir / "model.joblib")},
        }
    else:
        model = {
            "implementation": "mlserver_runtime.TorchScriptModel",
            "parameters": {"uri": str(workload.model_dir / "model.pt")},
        }
    model["name"] = workload.model_name
    if workload.peer_batching:
        model.update({"max_batch_size": MAX_BATCH_ROWS, "max_batch_time": MAX_BATCH_WAIT_MS / 1000})
    (model_dir / "model-settings.json").write_text(json.dumps(model, indent=2))
    return root


def peer_launch(peer: str, workload: Workload, port: int) -> LaunchSpec:
    venv = PEER_ENVS[peer].path
    py = str(venv / "bin" / "python")
    extra = workload_env(workload, port)
    if peer == "fastapi":
        cmd = [
            py,
            "-m",
            "uvicorn",
            "fastapi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    elif peer == "litserve":
        cmd = [py, str(PEERS_DIR / "litserve_app.py")]
    elif peer == "mlserver":
        cmd = [str(venv / "bin" / "mlserver"), "start", str(_mlserver_repo(workload, port))]
    elif peer == "bentoml":
        service = "bentoml_service:LogReg" if workload.key == "A" else "bentoml_service:Mlp"
        cmd = [str(venv / "bin" / "bentoml"), "serve", service, "--host", "127.0.0.1", "--port", str(port)]
        extra.update({"BENTOML_HOME": str(RUNTIME_DIR / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True"})
    elif peer == "ray":
        cmd = [py, str(PEERS_DIR / "rayserve_app.py")]
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-machine mode: its processes then talk
        # over 127.0.0.1 instead of the host's interface address.
        extra.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    else:
        raise ValueError(f"unknown peer {peer}")
    return LaunchSpec(cmd=cmd, env=base_env(venv, extra), cwd=PEERS_DIR)
