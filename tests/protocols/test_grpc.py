"""OIP v2 gRPC against the in-process server: typed contents, raw contents, errors, auth."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from servutil import REPO, EchoModel, GatedModel, LiveServer, TextModel, wait_for

from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

grpc = pytest.importorskip("grpc")
from modelpod.protocols._generated import open_inference_pb2 as pb  # noqa: E402

X = np.arange(6, dtype=np.float32).reshape(3, 2)


class Client:
    def __init__(self, port: int, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def __call__(self, method: str, request: Any, response: Any) -> Any:
        call = self.channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                        request_serializer=type(request).SerializeToString,
                                        response_deserializer=response.FromString)
        return call(request, metadata=self.metadata, timeout=30)

    def infer(self, request: Any) -> Any:
        return self("ModelInfer", request, pb.ModelInferResponse)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=2, policy=BatchPolicy(max_batch_rows=8))
        engine.add_model(TextModel(), name="text", version=1)

    with LiveServer(Settings(), setup, grpc=True) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    c = Client(server.grpc_port)
    yield c
    c.channel.close()


def echo(raw: bool, **kw: Any) -> Any:
    req = pb.ModelInferRequest(model_name="echo", **kw)
    t = req.inputs.add(name="x", datatype="FP32", shape=[3, 2])
    if raw:
        req.raw_input_contents.append(X.tobytes())
    else:
        t.contents.fp32_contents.extend(X.reshape(-1).tolist())
    return req


def test_health_and_metadata(client: Client) -> None:
    assert client("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
    assert client("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready
    assert client("ModelReady", pb.ModelReadyRequest(name="echo", version="2"), pb.ModelReadyResponse).ready
    meta = client("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse)
    assert meta.name == "modelpod" and "binary_tensor_data" in meta.extensions
    m = client("ModelMetadata", pb.ModelMetadataRequest(name="echo"), pb.ModelMetadataResponse)
    assert m.name == "echo" and list(m.versions) == ["2"] and m.platform == "python"
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("x", "FP32", [-1, 2])]


def test_infer_typed_contents(client: Client) -> None:
    resp = client.infer(echo(raw=False, id="g-1"))
    assert resp.model_name == "echo" and resp.model_version == "2" and resp.id == "g-1"
    assert not resp.raw_output_contents
    y = next(o for o in resp.outputs if o.name == "y")
    assert list(y.shape) == [3, 2] and list(y.contents.fp32_contents) == X.reshape(-1).tolist()
    rows = next(o for o in resp.outputs if o.name == "batch_rows")
    assert list(rows.contents.int64_contents) == [3, 3, 3]


def test_infer_raw_contents_and_requested_outputs(client: Client) -> None:
    req = echo(raw=True)
    req.outputs.add(name="y")
    resp = client.infer(req)
    assert [o.name for o in resp.outputs] == ["y"] and len(resp.raw_output_contents) == 1
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(3, 2), X)


def test_bytes_typed_and_raw(client: Client) -> None:
    req = pb.ModelInferRequest(model_name="text")
    req.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"ab", b"c"])
    assert list(client.infer(req).outputs[0].contents.bytes_contents) == [b"AB", b"C"]
    req = pb.ModelInferRequest(model_name="text", raw_input_contents=[b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"])
    req.inputs.add(name="text", datatype="BYTES", shape=[2])
    assert client.infer(req).raw_output_contents[0] == b"\x02\x00\x00\x00AB\x01\x00\x00\x00C"


@pytest.mark.parametrize("mutate, code", [
    (lambda r: setattr(r, "model_name", "missing"), "NOT_FOUND"),
    (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND"),
    (lambda r: r.inputs[0].shape.__setitem__(1, 3), "INVALID_ARGUMENT"),
    (lambda r: setattr(r.inputs[0], "datatype", "NOPE"), "INVALID_ARGUMENT"),
    (lambda r: r.raw_input_contents.append(b"\x00"), "INVALID_ARGUMENT"),
])
def test_errors_map_to_status_codes(client: Client, mutate: Any, code: str) -> None:
    req = echo(raw=True)
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        client.infer(req)
    assert info.value.code() == getattr(grpc.StatusCode, code)


def test_overload_is_unavailable_and_auth() -> None:
    model = GatedModel()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(model, name="gated", version=1, policy=BatchPolicy(max_queue=1))

    with LiveServer(Settings(token="tok"), setup, grpc=True) as live:
        anon, ok = Client(live.grpc_port), Client(live.grpc_port, "tok")
        assert anon("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live  # probes are open
        req = pb.ModelInferRequest(model_name="gated", raw_input_contents=[X.tobytes()])
        req.inputs.add(name="x", datatype="FP32", shape=[3, 2])
        with pytest.raises(grpc.RpcError) as info:
            anon.infer(req)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(ok.infer(req))) for _ in range(2)]
        threads[0].start()
        wait_for(lambda: model.entered == 1, 30, "predict to start")
        threads[1].start()
        wait_for(lambda: live.engine.resolve("gated").batcher.queue_depth == 1, 30, "one queued")  # type: ignore[union-attr]
        with pytest.raises(grpc.RpcError) as info:
            ok.infer(req)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        model.gate.set()
        for t in threads:
            t.join(30)
        assert len(results) == 2
        anon.channel.close()
        ok.channel.close()


def test_stubs_coexist_with_tritonclient_in_one_process() -> None:
    """Our messages live in a private descriptor pool, so tritonclient's copies do not clash."""
    pytest.importorskip("tritonclient.grpc")
    code = ("import tritonclient.grpc.service_pb2 as t\n"
            "from modelpod.protocols._generated import open_inference_pb2 as pb\n"
            "m = pb.ModelInferRequest(model_name='x', id='1')\n"
            "assert t.ModelInferRequest.FromString(m.SerializeToString()).model_name == 'x'\n")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_serving_imports_without_grpcio() -> None:
    code = ("import sys; sys.modules['grpc'] = None\n"
            "import modelpod.serving, modelpod.serving.server, modelpod.protocols.rest\n"
            "from modelpod.errors import MissingExtraError\n"
            "try:\n    import modelpod.protocols.grpc\nexcept MissingExtraError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'modelpod[grpc]'" in proc.stdout
