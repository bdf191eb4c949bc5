"""Detector outputs -> boxes: the three YOLO output layouts, class-aware NMS in numpy, and the
mapping from letterboxed back to original pixel coordinates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.vision.image import Letterbox

Array = np.ndarray[Any, Any]

LAYOUTS = ("yolov8", "yolov5", "end2end")
MAX_WH = 7680.0  # the per-class offset that keeps classes apart in one NMS (as Ultralytics)
MAX_NMS = 30000  # candidates kept for NMS, best first


@dataclass(frozen=True)
class Options:
    """Per-request detection settings (the request's ``parameters``)."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None


def guess_layout(shape: tuple[int, ...], nc: int | None) -> str:
    """The layout of a detector's output of ``shape`` ([1, 4+nc, N], [1, N, 5+nc] or [1, K, 6]).
    Without class names (``nc`` None): the boxes run along the longer axis, as in every YOLO export."""
    if len(shape) != 3:
        raise FrameworkError(f"detector output has shape {list(shape)}; expected 3 dimensions")
    _, a, b = shape
    if nc is None:
        if b == 6:
            return "end2end"
        if 0 < a < b:
            return "yolov8"
        if 0 < b < a:
            return "yolov5"
        raise FrameworkError(f"cannot tell the layout of a detector output {list(shape)}; "
                             f"pass --classes FILE or --option layout={'|'.join(LAYOUTS)}")
    if a == 4 + nc and b != 6:
        return "yolov8"
    if b == 5 + nc:
        return "yolov5"
    if b == 6:
        return "end2end"
    if a == 4 + nc:
        return "yolov8"
    raise FrameworkError(
        f"cannot tell the layout of a detector output {list(shape)} with {nc} classes; "
        f"pass --option layout={'|'.join(LAYOUTS)}")


def xywh2xyxy(b: Array) -> Array:
    out = np.empty_like(b)
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    out[:, 0], out[:, 1] = b[:, 0] - half_w, b[:, 1] - half_h
    out[:, 2], out[:, 3] = b[:, 0] + half_w, b[:, 1] + half_h
    return out


def candidates(pred: Array, layout: str, opts: Options) -> tuple[Array, Array, Array]:
    """One image's raw output -> (boxes xyxy [n,4], scores [n], class ids [n]) above ``conf``."""
    pred = np.asarray(pred, dtype=np.float32)
    if layout == "end2end":
        boxes, scores, ids = pred[:, :4], pred[:, 4], pred[:, 5].astype(np.int64)
    else:
        if layout == "yolov8":
            pred = pred.T  # [N, 4+nc]
            cls = pred[:, 4:]
        elif layout == "yolov5":
            cls = pred[:, 5:] * pred[:, 4:5]
        else:
            raise FrameworkError(f"unknown detector layout {layout!r}; known: {', '.join(LAYOUTS)}")
        if cls.shape[1] == 0:
            raise FrameworkError(f"detector output has no class scores ({layout} layout)")
        ids = cls.argmax(axis=1)
        scores = cls[np.arange(len(cls)), ids]
        boxes = xywh2xyxy(pred[:, :4])
    keep = scores > opts.conf
    if opts.classes is not None:
        keep &= np.isin(ids, np.asarray(opts.classes, dtype=np.int64))
    return boxes[keep], scores[keep], ids[keep]


def nms(boxes: Array, scores: Array, iou: float) -> Array:
    """Greedy NMS: indices of the kept boxes, best score first; a box goes when its IoU with a
    better kept box is above ``iou``. Each step compares one box against all the rest at once."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    kept: list[int] = []
    while order.size:
        i = int(order[0])
        kept.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(kept, dtype=np.intp)


def detect(pred: Array, layout: str, opts: Options) -> tuple[Array, Array, Array]:
    """One image's output -> its detections in the model's input coordinates, best first."""
    boxes, scores, ids = candidates(pred, layout, opts)
    if layout == "end2end":
        order = np.argsort(-scores, kind="stable")[: opts.max_det]
        return boxes[order], scores[order], ids[order]
    if len(scores) > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes, scores, ids = boxes[top], scores[top], ids[top]
    shifted = boxes + (ids.astype(np.float32) * MAX_WH)[:, None]  # class-aware: classes never overlap
    keep = nms(shifted, scores, opts.iou)[: opts.max_det]
    return boxes[keep], scores[keep], ids[keep]


def to_original(boxes: Array, box: Letterbox) -> Array:
    """Boxes in letterboxed input pixels -> the original image's pixels, clipped to it."""
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, [0, 2]] -= box.left
    out[:, [1, 3]] -= box.top
    out /= np.float32(box.ratio)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, box.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, box.height)
    return out
