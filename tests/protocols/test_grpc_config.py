"""The ModelConfig RPC (Triton's, read by perf_analyzer and tritonclient) against a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servutil import EchoModel, LiveServer, TextModel

from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import PodRecord

pytest.importorskip("grpc")
triton = pytest.importorskip("tritonclient.grpc")
from google.protobuf import json_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as triton_config  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from modelpod.protocols._generated import open_inference_pb2 as pb  # noqa: E402


@pytest.fixture(scope="module")
def server(served_home: tuple[Path, PodRecord]) -> Iterator[LiveServer]:
    home, _ = served_home

    def setup(engine: InferenceEngine) -> None:
        engine.add("lr")  # a real sklearn pod
        engine.add_model(EchoModel(), name="echo", version=2, policy=BatchPolicy(max_batch_rows=8))
        engine.add_model(TextModel(), name="text", version=1)

    with LiveServer(Settings(home=home), setup, grpc=True) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[Any]:
    c = triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


def rest_config(server: LiveServer, path: str) -> dict[str, Any]:
    resp = httpx.get(f"{server.url}{path}", timeout=30)
    assert resp.status_code == 200, resp.text
    config: dict[str, Any] = resp.json()
    return config


@pytest.mark.parametrize("name, version, path", [
    ("lr", "", "/v2/models/lr/config"),
    ("echo", "", "/v2/models/echo/config"),
    ("echo", "2", "/v2/models/echo/versions/2/config"),
    ("text", "1", "/v2/models/text/versions/1/config"),
])
def test_tritonclient_reads_the_rest_config(server: LiveServer, client: Any, name: str, version: str,
                                            path: str) -> None:
    got = client.get_model_config(name, version).config  # decoded by Triton's own ModelConfig
    rest = rest_config(server, path)
    assert got == json_format.ParseDict(rest, triton_config.ModelConfig())
    assert got.name == name and got.max_batch_size == rest["max_batch_size"]
    for tensors, want in ((got.input, rest["input"]), (got.output, rest["output"])):
        assert [(t.name, triton_config.DataType.Name(t.data_type), list(t.dims)) for t in tensors] == [
            (t["name"], t["data_type"], t["dims"]) for t in want]


def test_batched_and_unbatched_shapes(client: Any) -> None:
    echo = client.get_model_config("echo").config
    assert echo.max_batch_size == 8 and echo.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert [list(t.dims) for t in echo.input] == [[2]]  # the batch dimension is left out
    assert list(echo.version_policy.specific.versions) == [2]
    text = client.get_model_config("text").config
    assert text.max_batch_size == 0 and not text.HasField("dynamic_batching")
    assert text.input[0].data_type == triton_config.TYPE_STRING and list(text.input[0].dims) == [-1]
    assert client.get_model_config("lr", as_json=True)["config"]["name"] == "lr"


@pytest.mark.parametrize("name, version", [("missing", ""), ("echo", "9")])
def test_unknown_model_is_not_found(client: Any, name: str, version: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config(name, version)
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_needs_a_read_token_when_auth_is_on() -> None:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1, policy=BatchPolicy(max_batch_rows=4))

    with LiveServer(Settings(token="tok"), setup, grpc=True) as live:
        c = triton.InferenceServerClient(f"127.0.0.1:{live.grpc_port}")
        try:
            with pytest.raises(InferenceServerException) as info:
                c.get_model_config("echo")
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            config = c.get_model_config("echo", headers={"authorization": "Bearer tok"}).config
            assert config.name == "echo" and config.max_batch_size == 4
        finally:
            c.close()


def _fields(message: Any) -> dict[str, tuple[int, int, bool, str]]:
    return {f.name: (f.number, f.type, f.is_repeated, (f.message_type or f.enum_type or f).name)
            for f in message.DESCRIPTOR.fields}


@pytest.mark.parametrize("ours, theirs", [
    (pb.ModelConfig, triton_config.ModelConfig), (pb.ModelInput, triton_config.ModelInput),
    (pb.ModelOutput, triton_config.ModelOutput), (pb.ModelVersionPolicy, triton_config.ModelVersionPolicy),
    (pb.ModelVersionPolicy.Latest, triton_config.ModelVersionPolicy.Latest),
    (pb.ModelVersionPolicy.Specific, triton_config.ModelVersionPolicy.Specific),
    (pb.ModelDynamicBatching, triton_config.ModelDynamicBatching),
])
def test_messages_are_a_subset_of_tritons(ours: Any, theirs: Any) -> None:
    """Every field we declare has Triton's number, type and name, so either side decodes the other."""
    mine, tritons = _fields(ours), _fields(theirs)
    assert {k: tritons.get(k) for k in mine} == mine


def test_enums_match_tritons() -> None:
    pairs = ((pb.DataType, triton_config.DataType), (pb.ModelInput.Format, triton_config.ModelInput.Format))
    for ours, theirs in pairs:
        assert dict(ours.items()) == dict(theirs.items())
