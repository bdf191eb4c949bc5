"""examples/detector.py: a tiny YOLO-shaped network trained on generated coloured shapes, exported
with Ultralytics' metadata, packed without options (recognised as a detector) and finding the
shapes of fresh images in their own pixels."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from modelpod import api
from modelpod.cli import main
from modelpod.store import Store

pytestmark = pytest.mark.timeout(1500)  # the session fixture trains the example (about a minute when quiet)


def iou(a: Any, b: Any) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def packed(shapes_detector: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Store]:
    module, out = shapes_detector
    store = Store(tmp_path_factory.mktemp("home"))
    api.pack(out / "shapes.onnx", "shapes", store=store)  # no --task: Ultralytics metadata says detect
    return module, out, store


def test_metadata_as_ultralytics_writes_it(packed: tuple[Any, Path, Store]) -> None:
    _, out, store = packed
    meta = {p.key: p.value for p in onnx.load(str(out / "shapes.onnx")).metadata_props}
    assert {"description", "author", "date", "version", "license", "docs", "stride", "task", "batch", "imgsz",
            "names", "args", "channels", "end2end"} <= set(meta)
    assert meta["task"] == "detect" and meta["imgsz"] == "[128, 128]" and meta["stride"] == "16"
    assert meta["names"] == "{0: 'square', 1: 'circle', 2: 'triangle'}"
    vision = store.get("shapes").manifest.options["vision"]
    assert vision == {"task": "detect", "names": ["square", "circle", "triangle"], "imgsz": [128, 128],
                      "stride": 16, "layout": "yolov8"}


def test_finds_the_shapes_of_fresh_images(packed: tuple[Any, Path, Store]) -> None:
    module, _, store = packed
    model = api.load("shapes", store=store)
    rng = np.random.default_rng(4242)  # scenes the network never saw, of odd sizes
    found = total = 0
    for k in range(8):
        width, height = int(rng.integers(110, 240)), int(rng.integers(110, 240))
        img, shapes = module.scene(rng, width, height, count=3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        arr = np.empty(1, dtype=object)
        arr[0] = buf.getvalue()
        out = model({"images": arr})
        boxes, ids, scores = out["boxes"], out["class_ids"], out["scores"]
        assert out["detections"].tolist() == [len(boxes)]
        for cls, box in shapes:
            total += 1
            best = max((iou(b, box) for b, c in zip(boxes.tolist(), ids.tolist(), strict=True) if c == cls),
                       default=0.0)
            found += best >= 0.5
        # Nothing confident where there is no shape.
        for b, s in zip(boxes.tolist(), scores.tolist(), strict=True):
            if s > 0.5:
                assert max(iou(b, box) for _, box in shapes) > 0.3, (k, b, s, shapes)
    # A minute of training finds about 85 % of the shapes with the right class (measured: 82-85 %).
    assert total >= 16 and found >= 0.65 * total, f"found {found} of {total} shapes"


def test_predict_the_sample_jpeg(packed: tuple[Any, Path, Store], capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    _, out, store = packed
    truth = json.loads((out / "sample.json").read_text())
    capsys.readouterr()
    assert main(["--home", str(store.home), "predict", "shapes", "--image", str(out / "sample.jpg"),
                 "--annotate", str(tmp_path / "boxes.png"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    dets = printed["images"][0]["detections"]
    found = [any(d["class_name"] == shape["class_name"] and iou(d["box"], shape["box"]) >= 0.5 for d in dets)
             for shape in truth]
    assert len(truth) == 3 and sum(found) >= 2, (truth, dets)
    assert all(max(iou(d["box"], t["box"]) for t in truth) > 0.3 for d in dets if d["score"] > 0.5), (truth, dets)
    with Image.open(tmp_path / "boxes.png") as drawn:
        assert drawn.size == (200, 150)
