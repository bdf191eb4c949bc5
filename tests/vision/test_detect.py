"""Detector and classifier pods end to end in-process: pack (Ultralytics metadata or --task
options), images in, boxes in the original image's pixels out, for each output layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from graphs import batched_detector, classifier, detector
from imgutil import canvas, encode

from modelpod import api
from modelpod.errors import FrameworkError, InvalidRequestError
from modelpod.model import Model, with_parameters
from modelpod.store import Store

# (height, width, rectangle x1, y1, x2, y2): odd aspect ratios, each scaled up into 64x64.
CASES = [(25, 40, 3, 4, 17, 20), (50, 30, 10, 31, 27, 45), (41, 41, 0, 0, 9, 13), (13, 57, 40, 2, 57, 12)]


def _bytes_array(items: list[bytes]) -> np.ndarray[Any, Any]:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


@pytest.fixture
def packed(tmp_path: Path, store: Store) -> Any:
    def make(layout: str, **options: str) -> Model:
        path = detector(tmp_path / f"{layout}.onnx", layout, metadata=not options)
        if "classes" in options:
            (tmp_path / "names.txt").write_text("dim\nbright\n")
            options["classes"] = str(tmp_path / "names.txt")
        api.pack(path, f"det-{layout}", store=store, options=options)
        return api.load(f"det-{layout}", store=store)
    return make


@pytest.mark.parametrize(("layout", "options"), [
    ("yolov8", {}), ("end2end", {}), ("yolov5", {"task": "detect", "classes": "", "imgsz": "64"}),
])
def test_boxes_come_back_in_original_pixels(packed: Any, layout: str, options: dict[str, str]) -> None:
    model = packed(layout, **options)
    sig = model.signature
    assert [t.name for t in sig.inputs] == ["images"] and sig.inputs[0].datatype == "BYTES"
    assert sig.parameters["task"] == "detect" and sig.parameters["class_labels"] == ["dim", "bright"]
    assert model.pod is not None and model.pod.manifest.options["vision"]["layout"] == layout
    assert any(r.lower().startswith("pillow==") for r in model.pod.manifest.requirements)
    images = [encode(canvas(h, w, (x1, y1, x2, y2))) for h, w, x1, y1, x2, y2 in CASES]
    out = model({"images": _bytes_array(images)})
    assert out["detections"].tolist() == [2] * len(CASES)  # the box as class 1, and again as class 0
    start = 0
    for (h, w, x1, y1, x2, y2), n in zip(CASES, out["detections"].tolist(), strict=True):
        boxes, ids = out["boxes"][start:start + n], out["class_ids"][start:start + n]
        names = out["class_names"][start:start + n]
        start += n
        assert ids.tolist() == [1, 0] and names.tolist() == [b"bright", b"dim"]
        for box in boxes:
            assert np.abs(box - np.array([x1, y1, x2, y2])).max() <= 1.0, (h, w, box)
            assert 0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h
    assert out["scores"][:2].tolist() == pytest.approx([0.9, 0.5] if layout != "end2end" else [0.9, 0.4], abs=0.01)


def test_request_parameters_filter(packed: Any) -> None:
    model = packed("yolov8")
    img = _bytes_array([encode(canvas(30, 60, (5, 5, 20, 25)), "JPEG", quality=95)])
    only_dim = model.predict(with_parameters({"images": img}, {"classes": [0]}))
    assert only_dim["class_ids"].tolist() == [0]
    strict = model.predict(with_parameters({"images": img}, {"conf": 0.8}))
    assert strict["class_ids"].tolist() == [1] and strict["detections"].tolist() == [1]
    loose = model.predict(with_parameters({"images": img}, {"conf": 0.05, "iou": 0.99, "max_det": 10}))
    # the shifted copy survives now; the low-score row equals the class-0 box (IoU 1) and goes
    assert loose["scores"].tolist() == pytest.approx([0.9, 0.6, 0.5])
    assert model.predict(with_parameters({"images": img}, {"max_det": 1}))["detections"].tolist() == [1]
    for bad in ({"conf": 2}, {"iou": "x"}, {"max_det": 0}, {"classes": ["a"]}):
        with pytest.raises(InvalidRequestError, match="parameter"):
            model.predict(with_parameters({"images": img}, bad))


def test_no_detection_gives_empty_rows(packed: Any) -> None:
    model = packed("end2end")
    out = model({"images": _bytes_array([encode(canvas(20, 20, (2, 2, 10, 10)))])})
    empty = model.predict(with_parameters({"images": _bytes_array([encode(canvas(20, 20, (2, 2, 10, 10)))])},
                                          {"conf": 0.95}))
    assert out["boxes"].shape == (2, 4)
    assert empty["boxes"].shape == (0, 4) and empty["detections"].tolist() == [0] and empty["class_names"].size == 0


def test_base64_elements_are_accepted(packed: Any) -> None:
    import base64

    model = packed("end2end")
    raw = encode(canvas(20, 40, (4, 4, 12, 16)))
    out = model({"images": _bytes_array([base64.b64encode(raw), b"data:image/png;base64," + base64.b64encode(raw)])})
    assert out["detections"].tolist() == [2, 2]


def test_image_limits(tmp_path: Path, store: Store) -> None:
    path = detector(tmp_path / "d.onnx", "yolov8")
    api.pack(path, "lim", store=store, options={"max_images": "2", "max_pixels": "1000"})
    model = api.load("lim", store=store)
    small = encode(canvas(20, 20))
    with pytest.raises(InvalidRequestError, match="3 images in one request; the limit is 2"):
        model({"images": _bytes_array([small] * 3)})
    with pytest.raises(InvalidRequestError, match=r"images\[1\]: 40x40 is 1600 pixels"):
        model({"images": _bytes_array([small, encode(canvas(40, 40))])})


def test_classifier_top_k(tmp_path: Path, store: Store) -> None:
    api.pack(classifier(tmp_path / "c.onnx"), "colour", store=store)
    model = api.load("colour", store=store)
    red, blue = np.zeros((20, 50, 3), np.uint8), np.zeros((40, 30, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 200
    out = model({"images": _bytes_array([encode(red), encode(blue)])})
    assert out["class_names"][:, 0].tolist() == [b"red", b"blue"]
    assert out["class_ids"].shape == (2, 3) and out["probabilities"][0, 0] > 0.99
    top1 = model.predict(with_parameters({"images": _bytes_array([encode(red)])}, {"top_k": 1}))
    assert top1["class_ids"].tolist() == [[0]]


def test_pack_refuses_what_it_cannot_read(tmp_path: Path, store: Store) -> None:
    path = detector(tmp_path / "d.onnx", "yolov8", metadata=False)
    with pytest.raises(FrameworkError, match="task 'segment' is not supported"):
        api.pack(path, "x", store=store, options={"task": "segment"})
    with pytest.raises(FrameworkError, match="--classes"):
        api.pack(path, "x", store=store, options={"task": "detect", "classes": str(tmp_path / "missing.txt")})
    with pytest.raises(FrameworkError, match="--imgsz 320,320 does not fit the model's input"):
        api.pack(path, "x", store=store, options={"task": "detect", "imgsz": "320"})
    with pytest.raises(FrameworkError, match="stride 'x' is not an integer"):
        api.pack(path, "x", store=store, options={"task": "detect", "imgsz": "64", "stride": "x"})
    plain = api.pack(path, "plain", store=store)  # no task: a plain tensor model, as before
    assert plain.manifest.signature.inputs[0].name == "images"
    assert plain.manifest.signature.inputs[0].datatype == "FP32"


def test_annotate_draws_each_box_in_its_class_colour(packed: Any) -> None:
    import base64

    from modelpod.vision.draw import color
    from modelpod.vision.image import decode

    model = packed("end2end")
    img = encode(canvas(60, 100, (20, 30, 70, 55)))
    plain = model.predict(with_parameters({"images": _bytes_array([img])}, {}))
    assert "annotated" not in plain
    out = model.predict(with_parameters({"images": _bytes_array([img, img])}, {"annotate": True}))
    assert out["annotated"].shape == (2,)
    drawn = decode(base64.b64decode(out["annotated"][0]))
    assert drawn.shape == (60, 100, 3)
    # The last box drawn (class 0, the same place) outlines the rectangle (found within a pixel);
    # its inside stays as it was.
    assert any(tuple(drawn[42, x]) == color(0) for x in range(19, 22))
    assert any(tuple(drawn[y, 45]) == color(0) for y in range(53, 57))
    assert tuple(drawn[45, 45]) == (255, 255, 255) and tuple(drawn[5, 90]) == (0, 0, 0)
    with pytest.raises(InvalidRequestError, match="parameter 'annotate'"):
        model.predict(with_parameters({"images": _bytes_array([img])}, {"annotate": "maybe"}))


def test_predict_command_on_image_files(tmp_path: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from modelpod.cli import main
    from modelpod.vision.image import decode

    api.pack(detector(tmp_path / "d.onnx", "yolov8"), "det", store=store)
    (tmp_path / "a.png").write_bytes(encode(canvas(25, 40, (3, 4, 17, 20))))
    (tmp_path / "b.jpg").write_bytes(encode(canvas(50, 30, (10, 31, 27, 45)), "JPEG", quality=95))
    home = str(store.home)
    argv = ["--home", home, "predict", "det", "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.jpg"),
            "--annotate", str(tmp_path / "out.png")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    first = out["images"][0]["detections"][0]
    assert first["class_name"] == "bright" and np.abs(np.array(first["box"]) - [3, 4, 17, 20]).max() <= 1
    assert [len(i["detections"]) for i in out["images"]] == [2, 2]
    assert decode((tmp_path / "out-2.png").read_bytes()).shape == (50, 30, 3)
    assert main(["--home", home, "predict", "det", "--image", str(tmp_path / "missing.png")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_without_class_names_ids_name_themselves(tmp_path: Path, store: Store) -> None:
    path = detector(tmp_path / "d.onnx", "yolov5", metadata=False)
    api.pack(path, "anon", store=store, options={"task": "detect", "layout": "yolov5"})  # imgsz from the input
    model = api.load("anon", store=store)
    assert model.signature.parameters["imgsz"] == [64, 64] and model.signature.parameters["class_labels"] == []
    out = model({"images": _bytes_array([encode(canvas(30, 30, (5, 5, 20, 20)))])})
    assert out["class_names"].tolist() == [b"1", b"0"]
    with pytest.raises(FrameworkError, match="layout 'yolov9' unknown"):
        api.pack(path, "anon", store=store, options={"task": "detect", "layout": "yolov9"})


def test_a_free_batch_model_runs_the_request_images_together(tmp_path: Path, store: Store) -> None:
    api.pack(batched_detector(tmp_path / "b.onnx"), "batched", store=store)
    model = api.load("batched", store=store)
    runs: list[int] = []
    run = model.pipeline.run  # type: ignore[attr-defined]

    def counted(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        runs.append(len(batch))
        return run(batch)  # type: ignore[no-any-return]

    model.pipeline.run = counted  # type: ignore[attr-defined]
    out = model({"images": _bytes_array([encode(canvas(h, w, (x1, y1, x2, y2))) for h, w, x1, y1, x2, y2 in CASES])})
    assert runs == [len(CASES)]
    assert out["detections"].tolist() == [2] * len(CASES)
    for i, (_, _, x1, y1, x2, y2) in enumerate(CASES):
        assert np.abs(out["boxes"][2 * i] - np.array([x1, y1, x2, y2])).max() <= 1.0


def test_an_ultralytics_segment_export_packs_as_a_plain_model(tmp_path: Path, store: Store) -> None:
    import onnx

    path = detector(tmp_path / "seg.onnx", "yolov8")
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == "task").value = "segment"
    onnx.save(proto, str(path))
    rec = api.pack(path, "seg", store=store)
    assert "vision" not in rec.manifest.options and rec.manifest.signature.inputs[0].datatype == "FP32"


def test_the_load_check_probe_predicts_a_small_image(tmp_path: Path, store: Store) -> None:
    """A pod packed without --sample: the build's load check (the probe) sends it one small PNG."""
    from modelpod import probe

    api.pack(batched_detector(tmp_path / "det.onnx"), "probed", store=store)
    pod = store.open("probed")
    inputs, synthetic = probe.sample_inputs(pod)
    assert synthetic and inputs["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
    result = probe.run(pod.path, pod.manifest)
    assert result.ok, result.error
