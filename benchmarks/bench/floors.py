"""The two floors modelpod is measured against in the same run, each printed with modelpod's ratio.

- **HTTP floor**: `peers/http_floor.py`, a bare uvloop + httptools server answering every request
  with the workload's canned OIP response, on the server core, driven by the same wrk runs.
- **Framework floor for cold start**: `python -c` that imports the framework, loads the model
  (A: scikit-learn's joblib file; B: the TorchScript file modelpod serves; ONNX: A's model as
  `model.onnx` in an onnxruntime session, the small pod's floor) and predicts once on the request's
  row, on the server core, from the repository venv (the libraries `modelpod serve` imports); the
  time from launch to exit, median of the cold-start launches.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from typing import Any

from .config import COLD_STARTS, PEERS_DIR, SERVER_CPU
from .modelpod import VENV
from .peers import LaunchSpec, base_env
from .procs import wait_quiet
from .workloads import Workload, check_prediction

HTTP_FLOOR = "http-floor"

# One statement list per floor, run as `python -c CODE MODEL_DIR BODY_FILE`; prints the prediction
# as JSON (ONNX: the label output, the first of the two skl2onnx writes).
_READ_ROW = ("import json, sys; import numpy as np; d = sys.argv[1]; "
             "t = json.load(open(sys.argv[2]))['inputs'][0]; "
             "x = np.asarray(t['data'], dtype=np.float32).reshape(t['shape']); ")
ONNX_FLOOR = "onnx"
FRAMEWORK_CODE = {
    # scikit-learn's own persistence (joblib): the least a process pays to answer from this model.
    "A": _READ_ROW + ("import joblib; m = joblib.load(d + '/model.joblib'); "
                      "print(json.dumps(m.predict(x).tolist()))"),
    "B": _READ_ROW + ("import torch; torch.set_num_threads(1); torch.set_grad_enabled(False); "
                      "m = torch.jit.load(d + '/model.pt').eval(); "
                      "print(json.dumps(m(torch.from_numpy(x)).numpy().ravel().tolist()))"),
    ONNX_FLOOR: _READ_ROW + ("import onnxruntime as ort; so = ort.SessionOptions(); so.intra_op_num_threads = 1; "
                             "s = ort.InferenceSession(d + '/model.onnx', sess_options=so, "
                             "providers=['CPUExecutionProvider']); "
                             "print(json.dumps(s.run(None, {t['name']: x})[0].ravel().tolist()))"),
}


def http_floor_launch(workload: Workload, port: int) -> LaunchSpec:
    """The floor server for ``workload``: it answers the prediction that workload expects."""
    data: list[Any] = [int(v) for v in workload.expected] if workload.output_datatype.startswith("INT") else list(
        workload.expected)
    answer = {"model_name": workload.model_name, "model_version": "1",
              "outputs": [{"name": "output-0", "datatype": workload.output_datatype,
                           "shape": [1] if len(data) == 1 else [1, len(data)], "data": data}]}
    env = base_env(VENV, {"BENCH_HOST": "127.0.0.1", "BENCH_PORT": str(port),
                          "BENCH_RESPONSE": json.dumps(answer, separators=(",", ":"))})
    return LaunchSpec(cmd=[str(VENV / "bin" / "python"), str(PEERS_DIR / "http_floor.py")], env=env, cwd=PEERS_DIR)


def framework_cold_start(workload: Workload, floor: str | None = None, deadline_s: float = 180.0) -> dict[str, Any]:
    """Median seconds of ``COLD_STARTS`` runs of the framework's own import + load + one predict;
    ``floor`` is the workload's key by default, or ``ONNX_FLOOR`` for its ONNX model."""
    floor = floor or workload.key
    code = FRAMEWORK_CODE.get(floor)
    python = VENV / "bin" / "python"
    body = workload.onnx_body_path if floor == ONNX_FLOOR else workload.body_path
    if code is None or not python.exists() or not body.exists():
        return {"status": "not available", "error": f"no framework floor {floor}, no {python} or no {body}"}
    runs: list[float] = []
    answer: Any = None
    cmd = ["taskset", "-c", SERVER_CPU, str(python), "-c", code, str(workload.model_dir), str(body)]
    for _ in range(COLD_STARTS):
        wait_quiet()
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=base_env(VENV, {}), timeout=deadline_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"did not finish within {deadline_s:.0f}s"}
        runs.append(time.perf_counter() - started)
        if proc.returncode != 0:
            return {"status": "failed", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    check = check_prediction(workload, {"outputs": [{"data": answer}]})
    return {"status": "ok", "cold_start_s": statistics.median(runs), "cold_start_runs_s": runs, "check": check,
            "command": ["python", "-c", code, str(workload.model_dir), str(body)]}
