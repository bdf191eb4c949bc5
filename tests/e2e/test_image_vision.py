"""The seeds' example end to end, offline: the shapes detector of examples/detector.py (trained here
on synthetic images, exported with Ultralytics' metadata) packed, built into an image without a
daemon, run under Docker, and called with JPEG/PNG files: boxes in the images' own pixels."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from modelpod.packing import pack
from modelpod.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(1500)]
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)


def _iou(a: Any, b: Any) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


@pytest.fixture(scope="module")
def detector_url(tmp_path_factory: pytest.TempPathFactory, shapes_detector: tuple[Any, Path], base_image: Any,
                 kit: Kit, docker_engine: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """The example packed as ``shapes``, built, loaded and run with --network host; (URL, build output)."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")

    _, out = shapes_detector
    root = tmp_path_factory.mktemp("visionimg")
    home = root / "home"
    kit.shared_wheels(home)
    rec = pack(out / "shapes.onnx", "shapes", Store(home))  # recognised from the ONNX metadata
    assert rec.manifest.signature.parameters["task"] == "detect"
    tag = f"modelpod-test/vision-shapes:{uuid.uuid4().hex[:12]}"
    built = kit.build_loaded(home, "shapes:1", base_image.oci, root / "image.tar", tag)
    cid = ""
    port = kit.free_port()
    try:
        cid = kit.docker("run", "-d", "--network", "host", "--read-only", "--user", "65532", "--name",
                         f"modelpod-test-vision-{uuid.uuid4().hex[:12]}", tag, "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        kit.wait_container(cid, lambda: kit.http_status(f"{url}/v2/models/shapes/ready") == 200, 240,
                           "the detector pod's image to be ready")
        yield url, built
    finally:
        if cid:
            kit.docker("rm", "-f", cid, check=False)
        kit.docker("rmi", tag, check=False)


def _scenes(module: Any, out: Path) -> tuple[list[bytes], list[list[tuple[str, Any]]]]:
    """The example's sample JPEG and a fresh 230x140 PNG scene; the files and their true shapes."""
    truth = [[(t["class_name"], t["box"]) for t in json.loads((out / "sample.json").read_text())]]
    img, shapes = module.scene(np.random.default_rng(99), 230, 140, count=3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    truth.append([(module.NAMES[c], list(b)) for c, b in shapes])
    return [(out / "sample.jpg").read_bytes(), buf.getvalue()], truth


def _assert_found(boxes: np.ndarray[Any, Any], names: list[str], counts: list[int],
                  truth: list[list[tuple[str, Any]]]) -> list[Any]:
    """Shapes found with their class in each image's own pixels (a minute of training finds about
    85 %); the detections per image."""
    assert len(counts) == len(truth) and sum(counts) == len(boxes) == len(names)
    start, found, per_image = 0, 0, []
    for n, shapes in zip(counts, truth, strict=True):
        mine = list(zip(names[start:start + n], boxes[start:start + n].tolist(), strict=True))
        start += n
        per_image.append(mine)
        found += sum(any(c == name and _iou(b, box) >= 0.5 for c, b in mine) for name, box in shapes)
    assert found >= 3, (found, truth, per_image)  # of 6
    return per_image


def test_json_base64_request_with_two_images(detector_url: tuple[str, dict[str, Any]],
                                             shapes_detector: tuple[Any, Path]) -> None:
    url, built = detector_url
    assert built["load_check"] == "passed"
    files, truth = _scenes(*shapes_detector)
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(files)],
                        "data": [base64.b64encode(f).decode() for f in files]}], "parameters": {"conf": 0.3}}
    resp = httpx.post(f"{url}/v2/models/shapes/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = {o["name"]: o for o in resp.json()["outputs"]}
    boxes = np.asarray(out["boxes"]["data"], dtype=np.float32).reshape(out["boxes"]["shape"])
    json_found = _assert_found(boxes, out["class_names"]["data"], out["detections"]["data"], truth)
    (Path(shapes_detector[1]) / "served.json").write_text(json.dumps(json_found))
    # A file that is not an image: 400 with the reason, and the server keeps serving.
    bad = httpx.post(f"{url}/v2/models/shapes/infer", timeout=60, json={"inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"GIF89a?").decode()]}]})
    assert bad.status_code == 400 and "images[0]" in bad.json()["error"]


def test_binary_extension_with_tritonclient(detector_url: tuple[str, dict[str, Any]],
                                            shapes_detector: tuple[Any, Path]) -> None:
    import tritonclient.http as httpclient

    url, _ = detector_url
    files, truth = _scenes(*shapes_detector)
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("images", [len(files)], "BYTES")
        inp.set_data_from_numpy(np.asarray(files, dtype=object), binary_data=True)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=True)
                  for n in ("boxes", "scores", "class_names", "detections")]
        result = client.infer("shapes", [inp], outputs=wanted, parameters={"conf": 0.3})
        names = [v.decode() for v in result.as_numpy("class_names").reshape(-1)]
        binary_found = _assert_found(result.as_numpy("boxes"), names, result.as_numpy("detections").tolist(), truth)
        saved = Path(shapes_detector[1]) / "served.json"
        if saved.exists():  # the same images over JSON: the same detections
            assert json.loads(json.dumps(binary_found)) == json.loads(saved.read_text())
    finally:
        client.close()
