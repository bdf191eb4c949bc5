"""NMS against a brute-force reference; layouts; the map back to original coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from modelpod.errors import FrameworkError
from modelpod.vision.boxes import Options, detect, guess_layout, nms, to_original
from modelpod.vision.image import Letterbox


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(8))
def test_nms_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    boxes = np.hstack([xy, xy + wh]).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct scores: one right order
    thr = float(rng.uniform(0.2, 0.8))
    assert nms(boxes, scores, thr).tolist() == _reference(boxes, scores, thr)


def test_nms_is_class_aware() -> None:
    # Two identical boxes of different classes both stay; same class, one goes.
    pred = np.zeros((6, 3), np.float32)  # yolov8: [4+2, N]
    pred[:4, 0] = pred[:4, 1] = pred[:4, 2] = [50, 50, 20, 20]
    pred[4, 0], pred[4, 1], pred[5, 2] = 0.9, 0.8, 0.7
    boxes, scores, ids = detect(pred, "yolov8", Options(conf=0.25, iou=0.5))
    assert ids.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.7])
    assert boxes[0].tolist() == pytest.approx([40, 40, 60, 60])
    only = detect(pred, "yolov8", Options(classes=(1,)))
    assert only[2].tolist() == [1]
    assert len(detect(pred, "yolov8", Options(conf=0.95))[1]) == 0
    assert len(detect(pred, "yolov8", Options(max_det=1))[1]) == 1


def test_yolov5_multiplies_objectness_and_end2end_keeps_order() -> None:
    pred = np.array([[10, 10, 4, 4, 0.5, 0.9, 0.1], [30, 30, 4, 4, 0.9, 0.2, 0.6]], np.float32)
    _, scores, ids = detect(pred, "yolov5", Options(conf=0.3))
    assert ids.tolist() == [1, 0] and scores.tolist() == pytest.approx([0.54, 0.45])
    e2e = np.array([[1, 2, 3, 4, 0.3, 2], [5, 6, 7, 8, 0.8, 1], [0, 0, 1, 1, 0.1, 0]], np.float32)
    boxes, scores, ids = detect(e2e, "end2end", Options())
    assert ids.tolist() == [1, 2] and boxes[0].tolist() == [5, 6, 7, 8]


def test_guess_layout() -> None:
    assert guess_layout((1, 84, 8400), 80) == "yolov8"
    assert guess_layout((1, 25200, 85), 80) == "yolov5"
    assert guess_layout((1, 300, 6), 80) == "end2end"
    assert guess_layout((1, 6, 8400), 2) == "yolov8"
    with pytest.raises(FrameworkError, match="layout"):
        guess_layout((1, 10, 10), 80)
    # No class names: the boxes run along the longer axis.
    assert guess_layout((1, 84, 8400), None) == "yolov8"
    assert guess_layout((1, 25200, 85), None) == "yolov5"
    assert guess_layout((1, 300, 6), None) == "end2end"
    assert guess_layout((1, -1, 6), None) == "end2end"
    with pytest.raises(FrameworkError, match="--classes"):
        guess_layout((1, -1, -1), None)


def test_boxes_map_back_and_clip() -> None:
    lb = Letterbox(ratio=0.5, left=0, top=16, width=100, height=50)
    out = to_original(np.array([[10, 20, 30, 40], [-5, 0, 60, 60]], np.float32), lb)
    assert out.tolist() == [[20, 8, 60, 48], [0, 0, 100, 50]]
