"""Pods for the replica tests (tests/serving is on sys.path): a custom model that misbehaves on cue.

``behave`` doubles ``x`` and reports the pid that answered; the first value of a batch picks a
misbehaviour: -1 hangs, -2 kills its process once (a marker file under ``$REPLICA_TEST_MARKS``
remembers), -4 kills its process every time, -3 grows its memory by 128 MB, -5 sleeps 0.3 s, -6 sleeps 2 s.
With ``REPLICA_TEST_BREAK=1`` in its environment the module fails to import.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from modelpod.api import pack
from modelpod.store import PodRecord, Store

BEHAVE = '''
import os
import time

import numpy as np

from modelpod import Model

if os.environ.get("REPLICA_TEST_BREAK") == "1":
    import a_module_that_is_not_there  # noqa: F401

_HELD = []


class Behave(Model):
    def predict(self, inputs):
        x = np.asarray(inputs["x"], dtype=np.float32)
        first = float(x[0, 0]) if x.size else 0.0
        if first == -1:
            time.sleep(3600)
        if first == -2:
            mark = os.path.join(os.environ["REPLICA_TEST_MARKS"], "crashed")
            if not os.path.exists(mark):
                open(mark, "w").close()
                os._exit(7)
        if first == -4:
            os._exit(9)
        if first == -3:
            _HELD.append(np.ones(16 * 2**20))
        if first == -5:
            time.sleep(0.3)
        if first == -6:
            time.sleep(2.0)
        return {"y": x * 2, "pid": np.full(len(x), os.getpid(), dtype=np.int64)}
'''


def behave_pod(root: Path, home: Path) -> PodRecord:
    code = root / "behave"
    code.mkdir(parents=True, exist_ok=True)
    (code / "model.py").write_text(textwrap.dedent(BEHAVE))
    return pack(code, "behave", store=Store(home), sample={"x": np.zeros((2, 2), np.float32)})


def onnx_pod(root: Path, home: Path) -> tuple[PodRecord, np.ndarray]:
    """A LogisticRegression converted by skl2onnx; (record, sample rows)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    est = LogisticRegression().fit(x, (x[:, 0] > 0).astype(np.int64))
    onx = to_onnx(est, initial_types=[("features", FloatTensorType([None, 5]))],
                  options={id(est): {"zipmap": False}}, target_opset=17)
    path = root / "lr.onnx"
    path.write_bytes(onx.SerializeToString())
    return pack(path, "lronnx", store=Store(home), sample=x[:4]), x[:16]


def torch_pod(root: Path, home: Path) -> tuple[PodRecord, np.ndarray]:
    """A seeded TorchScript MLP; (record, sample rows)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    path = root / "mlp.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    x = np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32)
    return pack(path, "mlp", store=Store(home), sample=x[:4]), x


def weights_pod(root: Path, home: Path, mb: int) -> tuple[PodRecord, int]:
    """An ONNX model ``y = x @ W`` whose W (float32, random) holds ``mb`` MB; (record, W's bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = int((mb * 2**20 / 4) ** 0.5)
    w = np.random.default_rng(4).standard_normal((n, n), dtype=np.float32) * 0.01
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "weights",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "W")])
    path = root / "weights.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return pack(path, "weights", store=Store(home)), w.nbytes


ECHO = '''
import numpy as np

from modelpod import Model


class Echo(Model):
    def predict(self, inputs):
        return {name + "_out": np.array(value) for name, value in inputs.items()}
'''


def echo_sample(rows: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """One input per OIP datatype, ``rows`` rows of 3, random values (every bit pattern for numbers)."""
    from modelpod.pod import DATATYPES

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for datatype, dtype in sorted(DATATYPES.items()):
        if datatype == "BYTES":
            flat = np.empty(rows * 3, dtype=object)
            flat[:] = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 6)), dtype=np.uint8))
                       for _ in range(rows * 3)]
            out[datatype.lower()] = flat.reshape(rows, 3)
        elif dtype.kind == "b":
            out[datatype.lower()] = rng.integers(0, 2, size=(rows, 3)).astype(bool)
        else:
            out[datatype.lower()] = np.frombuffer(rng.bytes(rows * 3 * dtype.itemsize), dtype).reshape(rows, 3)
    return out


def echo_pod(root: Path, home: Path) -> PodRecord:
    """A custom model that answers each input as ``NAME_out``; one input per datatype."""
    code = root / "echo"
    code.mkdir(parents=True, exist_ok=True)
    (code / "model.py").write_text(textwrap.dedent(ECHO))
    return pack(code, "echo", store=Store(home), sample=echo_sample())
