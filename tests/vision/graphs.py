"""ONNX graphs whose outputs follow from the input image: a 'detector' that finds the bright
rectangle in its input and writes it out in each YOLO layout, and a colour 'classifier'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NAMES = {0: "dim", 1: "bright"}
SHAPES = {"yolov8": [1, 6, 4], "yolov5": [1, 4, 7], "end2end": [1, 3, 6]}


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, value: np.ndarray | float) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def const_int(self, value: list[int]) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    def op(self, kind: str, *inputs: str, **attrs: object) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def edges(self, any_: str, size: int) -> tuple[str, str]:
        """First bright index and one past the last, along one axis ([1] each)."""
        idx = self.const(np.arange(size, dtype=np.float32))
        big = self.op("Mul", self.op("Sub", self.const(1.0), any_), self.const(1e6))
        lo = self.op("ReduceMin", self.op("Add", idx, big), keepdims=1)
        hi = self.op("ReduceMax", self.op("Sub", self.op("Add", idx, self.const(1.0)), big), keepdims=1)
        return lo, hi


def detector(path: Path, layout: str, height: int = 64, width: int = 64, metadata: bool = True) -> Path:
    """The detector for ``layout`` (yolov8, yolov5, end2end), input [1, 3, height, width].

    Every layout holds the found box as class 1 (best), a shifted copy of it (NMS drops it), the same
    box as class 0 (a different class: kept) and a low-score row (below conf)."""
    g = _Graph()
    grey = g.op("ReduceMean", "images", axes=[1], keepdims=1)
    mask = g.op("Cast", g.op("Greater", grey, g.const(0.5)), to=TensorProto.FLOAT)
    x1, x2 = g.edges(g.op("ReduceMax", mask, axes=[0, 1, 2], keepdims=0), width)
    y1, y2 = g.edges(g.op("ReduceMax", mask, axes=[0, 1, 3], keepdims=0), height)
    half = g.const(0.5)
    cx, cy = g.op("Mul", g.op("Add", x1, x2), half), g.op("Mul", g.op("Add", y1, y2), half)
    w, h = g.op("Sub", x2, x1), g.op("Sub", y2, y1)
    if layout == "yolov8":  # [1, 4+nc, N], columns: anchors
        vec = g.op("Concat", cx, cy, w, h, g.const(np.zeros(2)), axis=0)
        col = g.op("Reshape", vec, g.const_int([6, 1]))
        mask_, add = np.zeros((6, 4), np.float32), np.zeros((6, 4), np.float32)
        mask_[:4] = 1
        add[0, 1] = 1.0  # anchor 1: shifted one pixel right
        add[4:, 0], add[4:, 1], add[4:, 2], add[4:, 3] = [0, 0.9], [0, 0.6], [0.5, 0], [0.1, 0]
        out = g.op("Reshape", g.op("Add", g.op("Mul", col, g.const(mask_)), g.const(add)), g.const_int([1, 6, 4]))
    elif layout == "yolov5":  # [1, N, 5+nc] with objectness
        vec = g.op("Concat", cx, cy, w, h, g.const(np.zeros(3)), axis=0)
        row = g.op("Reshape", vec, g.const_int([1, 7]))
        mask_, add = np.zeros((4, 7), np.float32), np.zeros((4, 7), np.float32)
        mask_[:, :4] = 1
        add[1, 0] = 1.0
        add[:, 4:] = [[0.95, 0, 0.95], [0.8, 0, 0.75], [0.5, 1.0, 0], [0.2, 0.5, 0]]
        out = g.op("Reshape", g.op("Add", g.op("Mul", row, g.const(mask_)), g.const(add)), g.const_int([1, 4, 7]))
    else:  # end2end [1, K, 6]: x1, y1, x2, y2, score, class
        vec = g.op("Concat", x1, y1, x2, y2, g.const(np.zeros(2)), axis=0)
        row = g.op("Reshape", vec, g.const_int([1, 6]))
        mask_, add = np.zeros((3, 6), np.float32), np.zeros((3, 6), np.float32)
        mask_[:, :4] = 1
        add[:, 4:] = [[0.9, 1], [0.1, 0], [0.4, 0]]
        out = g.op("Reshape", g.op("Add", g.op("Mul", row, g.const(mask_)), g.const(add)), g.const_int([1, 3, 6]))
    g.nodes.append(helper.make_node("Identity", [out], ["output0"]))
    graph = helper.make_graph(
        g.nodes, "finder", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, SHAPES[layout])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    if metadata:  # as Ultralytics writes them: Python literals as strings
        helper.set_model_props(model, {"task": "detect", "names": repr(NAMES), "imgsz": repr([height, width]),
                                       "stride": "32", "batch": "1", "author": "tests"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def batched_detector(path: Path, size: int = 64) -> Path:
    """The yolov8-layout detector with a free batch dimension: each image's box found on its own."""
    g = _Graph()
    grey = g.op("ReduceMean", "images", axes=[1], keepdims=0)  # [B, H, W]
    mask = g.op("Cast", g.op("Greater", grey, g.const(0.5)), to=TensorProto.FLOAT)
    idx = g.const(np.arange(size, dtype=np.float32))

    def edges(any_: str) -> tuple[str, str]:  # any_: [B, size] -> first index, one past the last: [B, 1]
        big = g.op("Mul", g.op("Sub", g.const(1.0), any_), g.const(1e6))
        lo = g.op("ReduceMin", g.op("Add", idx, big), axes=[1], keepdims=1)
        hi = g.op("ReduceMax", g.op("Sub", g.op("Add", idx, g.const(1.0)), big), axes=[1], keepdims=1)
        return lo, hi

    x1, x2 = edges(g.op("ReduceMax", mask, axes=[1], keepdims=0))
    y1, y2 = edges(g.op("ReduceMax", mask, axes=[2], keepdims=0))
    half = g.const(0.5)
    cx, cy = g.op("Mul", g.op("Add", x1, x2), half), g.op("Mul", g.op("Add", y1, y2), half)
    zero = g.op("Mul", x1, g.const(0.0))
    vec = g.op("Concat", cx, cy, g.op("Sub", x2, x1), g.op("Sub", y2, y1), zero, zero, axis=1)  # [B, 6]
    col = g.op("Unsqueeze", vec, g.const_int([2]))  # [B, 6, 1]
    mask_, add = np.zeros((6, 4), np.float32), np.zeros((6, 4), np.float32)
    mask_[:4] = 1
    add[0, 1] = 1.0
    add[4:, 0], add[4:, 1], add[4:, 2], add[4:, 3] = [0, 0.9], [0, 0.6], [0.5, 0], [0.1, 0]
    g.nodes.append(helper.make_node("Add", [g.op("Mul", col, g.const(mask_)), g.const(add)], ["output0"]))
    graph = helper.make_graph(
        g.nodes, "finder", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 6, 4])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    helper.set_model_props(model, {"task": "detect", "names": repr(NAMES), "imgsz": repr([size, size])})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def classifier(path: Path, size: int = 32) -> Path:
    """Classes red, green, blue: softmax of 10x each channel's mean brightness."""
    g = _Graph()
    means = g.op("ReduceMean", "images", axes=[2, 3], keepdims=0)  # [1, 3]
    g.nodes.append(helper.make_node("Softmax", [g.op("Mul", means, g.const(10.0))], ["output0"], axis=1))
    graph = helper.make_graph(
        g.nodes, "colour", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    helper.set_model_props(model, {"task": "classify", "names": "{0: 'red', 1: 'green', 2: 'blue'}",
                                   "imgsz": f"[{size}, {size}]"})
    onnx.save(model, str(path))
    return path
