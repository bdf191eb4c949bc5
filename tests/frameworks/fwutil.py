"""Helpers for the adapter tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.store import PodRecord, Store

Arrays = Mapping[str, np.ndarray]
Check = Callable[..., dict[str, np.ndarray]]


def features(rows: int = 200, cols: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, cols)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, y


def sig(rec: PodRecord) -> dict[str, list[tuple[str, str, list[int]]]]:
    """A pod's signature as plain tuples, for compact assertions."""
    s = rec.manifest.signature
    return {
        "inputs": [(t.name, t.datatype, list(t.shape)) for t in s.inputs],
        "outputs": [(t.name, t.datatype, list(t.shape)) for t in s.outputs],
    }


class Evil:
    """Unpickling this runs a shell command: what the pickle defences exist for."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, ("echo pwned",)


def evil_pickle(path: Path) -> Path:
    with path.open("wb") as fh:
        pickle.dump({"weights": [1.0, 2.0], "payload": Evil()}, fh)
    return path


def assert_store_empty(store: Store) -> None:
    assert store.list() == []
    assert list(store.tmp.iterdir()) == []


# -- ONNX -------------------------------------------------------------------------------------
def mlp_weights(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32),
            rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))


def mlp_numpy(x: np.ndarray, seed: int = 1) -> np.ndarray:
    w1, b1, w2, b2 = mlp_weights(seed)
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


def onnx_mlp() -> Any:
    """An MLP graph built with onnx.helper: input x FP32 [batch, 4] -> y FP32 [batch, 3]."""
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = mlp_weights()
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# -- transformers ------------------------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "was", "good", "bad",
         "great", "awful", "plot", "actors", "is", "not", "very", "hello", "world"]
TEXTS = ["the movie was good", "awful plot", "hello world is not very great", "unknownword"]
