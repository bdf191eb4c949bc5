"""OIP v2 REST against the in-process server on an ephemeral loopback port."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import EchoModel, GatedModel, LiveServer, TextModel, echo_request, metric_value, wait_for

from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import PodRecord

X = np.arange(6, dtype=np.float32).reshape(3, 2)


@pytest.fixture(scope="module")
def server(served_home: tuple[Path, PodRecord]) -> Iterator[LiveServer]:
    home, _ = served_home

    def setup(engine: InferenceEngine) -> None:
        engine.add("lr")
        engine.add_model(EchoModel(), name="echo", version=1, policy=BatchPolicy(max_batch_rows=8))
        engine.add_model(TextModel(), name="text", version=1)

    with LiveServer(Settings(home=home, max_json_depth=8), setup) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    for path in ("/v2", "/v2/"):
        meta = client.get(path).json()
        assert meta["name"] == "modelpod" and "binary_tensor_data" in meta["extensions"]
    assert client.head("/v2/health/ready").status_code == 200


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v2/models/echo/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
    r = client.post("/v2/models/echo/unknown-action")
    assert r.status_code == 405
    assert client.get("/v2/models/echo/frobnicate").status_code == 404


def test_model_metadata_with_and_without_versions(client: httpx.Client) -> None:
    for path in ("/v2/models/lr", "/v2/models/lr/versions/1", "/v2/models/lr/versions/production"):
        meta = client.get(path).json()
        assert meta["name"] == "lr" and meta["versions"] == ["1"] and meta["platform"] == "sklearn"
        assert meta["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 20]}]
    for path in ("/v2/models/lr/ready", "/v2/models/lr/versions/1/ready", "/v2/models/lr/versions/production/ready"):
        assert client.get(path).status_code == 200
    assert client.get("/v2/models/lr/versions/2").status_code == 404
    assert client.get("/v2/models/lr/versions/staging/ready").status_code == 404
    r = client.get("/v2/models/missing")
    assert r.status_code == 404 and "missing" in r.json()["error"]


def test_triton_model_config(client: httpx.Client) -> None:
    config = client.get("/v2/models/lr/config").json()
    assert config["name"] == "lr" and config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input-0", "data_type": "TYPE_FP32", "dims": [20]}]
    assert config["output"] == [{"name": "output-0", "data_type": "TYPE_INT64", "dims": []}]
    assert client.get("/v2/models/text/versions/1/config").json()["input"][0]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize("path", ["/v2/models/echo/infer", "/v2/models/echo/versions/1/infer"])
def test_infer_flat_and_nested(client: httpx.Client, path: str) -> None:
    flat = client.post(path, json=echo_request(X, id="req-1"))
    assert flat.status_code == 200, flat.text
    body = flat.json()
    assert body["model_name"] == "echo" and body["model_version"] == "1" and body["id"] == "req-1"
    y = next(o for o in body["outputs"] if o["name"] == "y")
    assert y["shape"] == [3, 2] and y["datatype"] == "FP32" and y["data"] == X.reshape(-1).tolist()
    nested = echo_request(X)
    nested["inputs"][0]["data"] = X.tolist()
    assert client.post(path, json=nested).json()["outputs"] == body["outputs"]


def test_infer_sklearn(client: httpx.Client, sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    _, sample, est = sklearn_model
    req = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(sample.shape),
                       "data": sample.reshape(-1).tolist()}]}
    r = client.post("/v2/models/lr/versions/production/infer", json=req)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == est.predict(sample).tolist()


def test_requested_outputs_parameters_and_request_id(client: httpx.Client) -> None:
    req = echo_request(X, outputs=[{"name": "batch_rows"}], parameters={"anything": 1})
    r = client.post("/v2/models/echo/infer", json=req, headers={"X-Request-ID": "trace-7"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-7"
    assert [o["name"] for o in r.json()["outputs"]] == ["batch_rows"]
    r = client.post("/v2/models/echo/infer", json=echo_request(X, outputs=[{"name": "nope"}]))
    assert r.status_code == 400 and "nope" in r.json()["error"]
    r = client.post("/v2/models/echo/infer", json=echo_request(X, id="body-id"))
    assert r.headers["x-request-id"] == "body-id"


def test_bytes_tensors(client: httpx.Client) -> None:
    req = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["ab", "Cd"]}]}
    out = client.post("/v2/models/text/infer", json=req).json()["outputs"][0]
    assert out == {"name": "upper", "datatype": "BYTES", "shape": [2], "data": ["AB", "CD"]}


def test_binary_tensor_extension(client: httpx.Client) -> None:
    raw = X.tobytes()
    header = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "batch_rows"}],
    }).encode()
    r = client.post("/v2/models/echo/infer", content=header + raw, headers={
        "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    y, rows = head["outputs"]
    assert y["parameters"]["binary_data_size"] == len(raw) and "data" not in y
    np.testing.assert_array_equal(np.frombuffer(r.content[n:], dtype="<f4").reshape(3, 2), X)
    assert rows["data"] == [3, 3, 3]
    # binary_data_output asks for every output in binary.
    header = json.dumps({"inputs": json.loads(header)["inputs"], "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/echo/infer", content=header + raw,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    head = json.loads(r.content[: int(r.headers["inference-header-content-length"])])
    assert all("binary_data_size" in o["parameters"] for o in head["outputs"])


def test_gzip_request_body(client: httpx.Client) -> None:
    body = gzip.compress(json.dumps(echo_request(X)).encode())
    r = client.post("/v2/models/echo/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}).encode(),
     "shape"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}).encode(),
     "elements"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}).encode(), "datatype"),
    (json.dumps({"inputs": [{"name": "zz", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}).encode(), "zz"),
])
def test_bad_requests_are_400(client: httpx.Client, body: bytes, fragment: str) -> None:
    r = client.post("/v2/models/echo/infer", content=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_json_depth_cap_is_400(client: httpx.Client) -> None:
    deep = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
            "parameters": {"p": json.loads("[" * 20 + "]" * 20)}}
    r = client.post("/v2/models/echo/infer", json=deep)
    assert r.status_code == 400 and "deeper" in r.json()["error"]


def test_json_depth_cap_holds_in_long_bodies(client: httpx.Client) -> None:
    # Long bodies find their brackets another way than short ones; the cap must hold for both.
    rows = np.arange(2000, dtype=np.float32).reshape(1000, 2)
    deep = {**echo_request(rows), "parameters": {"p": json.loads("[" * 20 + "]" * 20)}}
    r = client.post("/v2/models/echo/infer", json=deep)
    assert r.status_code == 400 and "deeper" in r.json()["error"]
    r = client.post("/v2/models/echo/infer", json=echo_request(rows))
    assert r.status_code == 200, r.text


def test_metrics_endpoint(client: httpx.Client) -> None:
    client.post("/v2/models/echo/infer", json=echo_request(X))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric_value(r.text, "modelpod_requests_total", model="echo", outcome="success") >= 1


def test_repository_on_loopback_without_token(client: httpx.Client) -> None:
    index = client.post("/v2/repository/index").json()
    assert {"name": "echo", "version": "1", "state": "READY"} in index
    assert client.post("/v2/repository/models/text/unload").status_code == 200
    assert client.get("/v2/models/text/ready").status_code == 503
    r = client.post("/v2/models/text/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                              "data": ["a"]}]})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert client.post("/v2/repository/index", json={"ready": True}).json() == [
        r for r in index if r["state"] == "READY" and r["name"] != "text"]
    assert client.post("/v2/repository/models/text/load").status_code == 200
    assert client.get("/v2/models/text/ready").status_code == 200
    assert client.post("/v2/repository/models/missing/load").status_code == 404
    r = client.post("/v2/repository/models/echo/load", json={"parameters": {"file:1/model.onnx": "AAAA"}})
    assert r.status_code == 400 and "not accepted" in r.json()["error"]
    for bad in ("..%2F..%2Fetc", "%2Ftmp%2Fx", "http:%2F%2Fevil"):
        assert client.post(f"/v2/repository/models/{bad}/load").status_code in (400, 404)


def test_body_cap_is_413(served_home: tuple[Path, PodRecord]) -> None:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    with LiveServer(Settings(max_body_bytes=2048), setup) as live, httpx.Client(base_url=live.url) as c:
        big = echo_request(np.zeros((400, 2), dtype=np.float32))
        r = c.post("/v2/models/echo/infer", json=big)
        assert r.status_code == 413 and "error" in r.json()
        assert c.post("/v2/models/echo/infer", json=echo_request(X)).status_code == 200
        # A declared length over the cap is answered before any body is sent.
        with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10) as s:
            s.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
        gz = gzip.compress(b"[" + b"0," * 5000 + b"0]")
        r = c.post("/v2/models/echo/infer", content=gz, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413


def test_keep_alive_pipelining_and_expect_continue(server: LiveServer) -> None:
    body = json.dumps(echo_request(X)).encode()
    one = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(one + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + one)
        data = b""
        while data.count(b"HTTP/1.1 200") < 3:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert data.index(b"content-length: 0") > data.index(b'"model_name"')  # answered in order
        s.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_health_answers_while_a_model_is_busy_and_timeouts_are_504() -> None:
    model = GatedModel()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(model, name="gated", version=1, policy=BatchPolicy(timeout_s=0.2, max_queue=1))

    with LiveServer(Settings(), setup) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        results: list[httpx.Response] = []
        t = threading.Thread(target=lambda: results.append(c.post("/v2/models/gated/infer", json=echo_request(X))))
        t.start()
        wait_for(lambda: model.entered == 1, 30, "predict to start")
        # The predict holds its thread; the loop still answers.
        for _ in range(20):
            assert c.get("/v2/health/ready").status_code == 200
        assert not results
        t.join(30)
        assert results[0].status_code == 504 and "no answer within" in results[0].json()["error"]
        model.gate.set()


def test_overload_is_503_with_retry_after_at_once() -> None:
    model = GatedModel()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(model, name="gated", version=1, policy=BatchPolicy(max_queue=1, max_batch_rows=1))

    with LiveServer(Settings(), setup) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        done: list[int] = []
        threads = [threading.Thread(target=lambda: done.append(
            httpx.post(live.url + "/v2/models/gated/infer", json=echo_request(X), timeout=30).status_code))
            for _ in range(2)]
        threads[0].start()
        wait_for(lambda: model.entered == 1, 30, "predict to start")
        threads[1].start()
        wait_for(lambda: live.engine.resolve("gated").batcher.queue_depth == 1, 30, "one to queue")  # type: ignore[union-attr]
        r = c.post("/v2/models/gated/infer", json=echo_request(X))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]
        model.gate.set()
        for t in threads:
            t.join(30)
        assert done == [200, 200]
        text = c.get("/metrics").text
        assert metric_value(text, "modelpod_requests_total", model="gated", outcome="overloaded") == 1


def test_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    import modelpod.protocols.auth as auth

    # Tokens are looked up by their SHA-256 digest: no comparison that takes longer for a better guess.
    calls: list[str | bytes] = []
    real = auth.digest

    def spy(token: str | bytes) -> bytes:
        calls.append(token)
        return real(token)

    monkeypatch.setattr(auth, "digest", spy)

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    with LiveServer(Settings(token="s3cret"), setup) as live, httpx.Client(base_url=live.url) as c:
        r = c.post("/v2/models/echo/infer", json=echo_request(X))
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "error" in r.json()
        r = c.post("/v2/models/echo/infer", json=echo_request(X), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and calls[-1] == "wrong"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v2/models/echo/infer", json=echo_request(X), headers=ok).status_code == 200
        assert c.get("/v2/models/echo", headers=ok).status_code == 200
        assert c.get("/v2/models/echo").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.post("/v2/repository/index").status_code == 401
        assert c.post("/v2/repository/index", headers=ok).status_code == 200
        # Probes need no token.
        assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200


def test_repository_refused_beyond_loopback_without_token() -> None:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    # The app judges by the configured host; the test still binds loopback only.
    with LiveServer(Settings(host="0.0.0.0"), setup) as live, httpx.Client(base_url=live.url) as c:
        r = c.post("/v2/repository/models/echo/unload")
        assert r.status_code == 401 and "--token" in r.json()["error"]
        assert c.post("/v2/models/echo/infer", json=echo_request(X)).status_code == 200


def test_drain_refuses_new_requests_with_503(server: LiveServer) -> None:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    with LiveServer(Settings(), setup) as live, httpx.Client(base_url=live.url) as c:
        live.engine.begin_drain()
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/health/live").status_code == 200
        r = c.post("/v2/models/echo/infer", json=echo_request(X))
        assert r.status_code == 503 and "shutting down" in r.json()["error"]


def test_nan_and_infinity_are_accepted_like_triton(client: httpx.Client) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [NaN, -Infinity]}]}'
    r = client.post("/v2/models/echo/infer", content=body)
    assert r.status_code == 200, r.text
    y = next(o for o in r.json()["outputs"] if o["name"] == "y")
    assert y["data"] == [None, None]  # JSON has no NaN: orjson writes null
