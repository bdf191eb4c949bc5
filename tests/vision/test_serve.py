"""A detector pod behind a real ``modelpod serve`` on loopback: packed with the CLI's --task
options, images as base64 JSON and as binary tensors, parameters, and bad images -> 400."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from graphs import detector
from imgutil import canvas, encode
from servutil import PYTHON, REPO, ServeProcess, modelpod_serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    d = tmp_path_factory.mktemp("serve")
    home = d / "home"
    (d / "names.txt").write_text("dim\nbright\n")
    model = detector(d / "det.onnx", "yolov5", metadata=False)
    subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(home), "pack", str(model), "--name", "det",
                    "--task", "detect", "--classes", str(d / "names.txt"), "--imgsz", "64",
                    "--option", "max_images=4"], check=True, cwd=REPO, capture_output=True, timeout=120)
    with modelpod_serve(home, "det", "--grpc-port", "0") as proc:
        yield proc


def _infer(server: ServeProcess, images: list[bytes], parameters: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                                        "data": [base64.b64encode(i).decode() for i in images]}]}
    if parameters:
        body["parameters"] = parameters
    return httpx.post(f"{server.url}/v2/models/det/infer", json=body, timeout=60)


def _outputs(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    return {o["name"]: o for o in resp.json()["outputs"]}


def test_metadata_says_detect(server: ServeProcess) -> None:
    meta = httpx.get(f"{server.url}/v2/models/det", timeout=30).json()
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {"boxes", "scores", "class_ids", "class_names", "detections",
                                                   "annotated"}
    assert meta["parameters"]["task"] == "detect" and meta["parameters"]["class_labels"] == ["dim", "bright"]


def test_json_request_gives_boxes_in_original_pixels(server: ServeProcess) -> None:
    images = [encode(canvas(25, 40, (3, 4, 17, 20)), "PNG"), encode(canvas(90, 50, (10, 30, 40, 80)), "JPEG",
                                                                      quality=95)]
    out = _outputs(_infer(server, images))
    assert out["detections"]["data"] == [2, 2]
    assert out["boxes"]["shape"] == [4, 4] and out["class_names"]["data"] == ["bright", "dim", "bright", "dim"]
    boxes = out["boxes"]["data"]
    for got, want in zip((boxes[0:4], boxes[8:12]), ([3, 4, 17, 20], [10, 30, 40, 80]), strict=True):
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) <= 1.5, got  # JPEG edges blur a little


def test_binary_request_and_parameters(server: ServeProcess) -> None:
    img = encode(canvas(30, 60, (5, 5, 20, 25)))
    tensor = struct.pack("<I", len(img)) + img
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(tensor)}}],
                         "parameters": {"classes": [1], "conf": 0.5}}).encode()
    resp = httpx.post(f"{server.url}/v2/models/det/infer", content=header + tensor, timeout=60,
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream"})
    out = _outputs(resp)
    assert out["class_ids"]["data"] == [1] and out["detections"]["data"] == [1]


def test_annotate_returns_a_png(server: ServeProcess) -> None:
    out = _outputs(_infer(server, [encode(canvas(40, 40, (5, 5, 30, 30)))], {"annotate": True}))
    png = base64.b64decode(out["annotated"]["data"][0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrent_requests_keep_their_own_parameters(server: ServeProcess) -> None:
    img = encode(canvas(30, 60, (5, 5, 20, 25)))
    results: dict[int, Any] = {}

    def call(i: int) -> None:
        results[i] = _outputs(_infer(server, [img] * (1 + i % 2), {"classes": [i % 2]}))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(6):
        assert results[i]["class_ids"]["data"] == [i % 2] * (1 + i % 2)


@pytest.mark.parametrize(("images", "parameters", "reason"), [
    ([b"not an image"], None, "images[0]: not a JPEG, PNG or WebP"),
    ([encode(canvas(64, 64, (2, 2, 30, 30)), "JPEG")[:200]], None, "cannot decode"),
    ([b"\x89PNG\r\n\x1a\n" + bytes(30)], None, "images[0]"),
    ([encode(canvas(8, 8))] * 5, None, "5 images in one request; the limit is 4"),
    ([encode(canvas(8, 8))], {"conf": "high"}, "parameter 'conf'"),
    ([encode(canvas(8, 8))], {"max_det": -1}, "parameter 'max_det'"),
])
def test_bad_input_is_a_400_with_the_reason(server: ServeProcess, images: list[bytes],
                                            parameters: dict[str, Any] | None, reason: str) -> None:
    resp = _infer(server, images, parameters)
    assert resp.status_code == 400, resp.text
    assert reason in resp.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200


def test_a_decompression_bomb_is_refused(server: ServeProcess, tmp_path: Path) -> None:
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(1 << 20))) + chunk(b"IEND", b""))
    resp = _infer(server, [bomb])
    assert resp.status_code == 400 and "decompression bomb" in resp.json()["error"]


def test_grpc_with_raw_image_bytes(server: ServeProcess) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    images = np.array([encode(canvas(25, 40, (3, 4, 17, 20))), encode(canvas(41, 41, (0, 0, 9, 13)))], dtype=object)
    inp = grpcclient.InferInput("images", [2], "BYTES")
    inp.set_data_from_numpy(images)
    res = client.infer("det", [inp], parameters={"classes": "1", "annotate": True})
    assert res.as_numpy("detections").tolist() == [1, 1]
    boxes = res.as_numpy("boxes")
    assert np.abs(boxes - np.array([[3, 4, 17, 20], [0, 0, 9, 13]])).max() <= 1.0
    assert base64.b64decode(res.as_numpy("annotated")[1])[:4] == b"\x89PNG"
    client.close()
