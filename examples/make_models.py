"""Make small example models from synthetic data, and optionally pack them into the local store.

    pip install -e '.[sklearn,onnx,torch]'
    python examples/make_models.py                # writes examples/out/
    python examples/make_models.py --pack         # ... and runs `modelpod pack` on each

Writes a scikit-learn classifier (skops), a PyTorch MLP (TorchScript, and a torch.export program)
and the same MLP as ONNX, with a sample input (.npy) that gives the pods their signature. The ONNX graph is built with
``onnx.helper`` from the trained torch weights: ``torch.onnx.export`` needs ``onnxscript`` (not in
the extras) for its default exporter, and its older TorchScript-based exporter is deprecated.
With ``--pack`` the custom-code example in ``examples/custom/`` is packed too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FEATURES = 4
CLASSES = 3


def synthetic(rows: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian blobs in four dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=rows)
    x = (centres[y] + rng.normal(size=(rows, FEATURES))).astype(np.float32)
    return x, y.astype(np.int64)


def make_sklearn(out: Path, x: np.ndarray, y: np.ndarray) -> Path:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    est = LogisticRegression(max_iter=500).fit(x, y)
    path = out / "iris_like.skops"
    sio.dump(est, path)
    return path


def train_torch(x: np.ndarray, y: np.ndarray) -> object:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    return net.eval()


def make_torchscript(out: Path, net: object) -> Path:
    import torch

    path = out / "mlp.pt"
    with warnings.catch_warnings():
        # torch 2.10+ marks TorchScript deprecated in favour of torch.export; it still loads everywhere.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(path))
    return path


def make_exported(out: Path, net: object, x: np.ndarray) -> Path:
    """The same MLP as a torch.export program; its batch dimension is exported as dynamic."""
    import torch

    assert isinstance(net, torch.nn.Module)
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.from_numpy(x[:4]),), dynamic_shapes={"input": {0: batch}})
    path = out / "mlp.pt2"
    torch.export.save(program, str(path))
    return path


def make_onnx(out: Path, net: object) -> Path:
    """The same MLP as an ONNX graph (Gemm, Relu, Gemm) with a free batch dimension."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    assert isinstance(net, torch.nn.Sequential)
    first, last = net[0], net[2]
    weights = {
        "w1": first.weight.detach().numpy(), "b1": first.bias.detach().numpy(),
        "w2": last.weight.detach().numpy(), "b2": last.bias.detach().numpy(),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = out / "mlp.onnx"
    onnx.save(model, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "out", help="output directory (default examples/out)")
    p.add_argument("--pack", action="store_true", help="pack every model into the store with `modelpod pack`")
    p.add_argument("--home", help="store directory for --pack (default $MODELPOD_HOME or ~/.modelpod)")
    args = p.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    x, y = synthetic()
    sample = out / "sample.npy"
    np.save(sample, x[:4])  # all three models take FP32 [batch, 4]
    net = train_torch(x, y)
    made = {
        "example-sklearn": make_sklearn(out, x, y),
        "example-torch": make_torchscript(out, net),
        "example-export": make_exported(out, net, x),
        "example-onnx": make_onnx(out, net),
    }
    for name, path in made.items():
        print(f"{name:16} {path}")
    print(f"{'sample':16} {sample}")
    if not args.pack:
        return 0

    from modelpod.cli import main as modelpod

    home = ["--home", args.home] if args.home else []
    jobs = [[str(path), "--name", name, "--sample", str(sample)] for name, path in made.items()]
    jobs.append([str(HERE / "custom"), "--name", "example-custom"])  # type hints give its signature
    for job in jobs:
        print("$ modelpod pack " + " ".join(job))
        code = modelpod([*home, "pack", *job])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
