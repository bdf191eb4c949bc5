"""gRPC bounds: calls without a deadline get the server's, RPCs in progress are capped, a client
that never sends its message or never speaks HTTP/2 is dropped, and each refusal has a clear status."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, LiveServer, wait_for

from modelpod.errors import UsageError
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

grpc = pytest.importorskip("grpc")
from modelpod.protocols._generated import open_inference_pb2 as pb  # noqa: E402
from modelpod.protocols.grpc import server_options, start_grpc  # noqa: E402

SETTINGS = Settings(grpc_max_concurrent_rpcs=3, grpc_default_deadline_s=1.0, grpc_max_connection_age_s=2.0,
                    grpc_max_connection_age_grace_s=1.0, header_timeout_s=1.0, max_body_bytes=64 * 1024)
METHOD = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def gated() -> GatedModel:
    return GatedModel()


@pytest.fixture(scope="module")
def server(gated: GatedModel) -> Iterator[LiveServer]:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)
        engine.add_model(gated, name="gated", version=1)

    with LiveServer(SETTINGS, setup, grpc=True) as live:
        yield live
        gated.gate.set()


def channel(server: LiveServer) -> Any:
    return grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")


def infer_request(model: str, rows: int = 1) -> Any:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    req.raw_input_contents.append(np.zeros((rows, 2), dtype=np.float32).tobytes())
    return req


def unary(ch: Any, method: str, response: Any) -> Any:
    return ch.unary_unary(METHOD + method, request_serializer=lambda m: m.SerializeToString(),
                          response_deserializer=response.FromString)


def live(server: LiveServer) -> bool:
    with channel(server) as ch:
        return bool(unary(ch, "ServerLive", pb.ServerLiveResponse)(pb.ServerLiveRequest(), timeout=30).live)


def test_a_call_without_a_deadline_gets_the_servers(server: LiveServer, gated: GatedModel) -> None:
    with channel(server) as ch, pytest.raises(grpc.RpcError) as info:
        unary(ch, "ModelInfer", pb.ModelInferResponse)(infer_request("gated"))  # no timeout: would wait for ever
    err: Any = info.value
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "without a deadline" in err.details() and "MODELPOD_GRPC_DEFAULT_DEADLINE_S" in err.details()
    assert live(server)


def test_a_message_over_the_body_limit_is_refused(server: LiveServer) -> None:
    with channel(server) as ch, pytest.raises(grpc.RpcError) as info:
        unary(ch, "ModelInfer", pb.ModelInferResponse)(infer_request("echo", rows=10_000), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    with channel(server) as ch:
        assert unary(ch, "ModelInfer", pb.ModelInferResponse)(infer_request("echo"), timeout=30).model_name == "echo"


def test_stalled_senders_are_bounded_and_dropped(server: LiveServer) -> None:
    """Calls that send their headers and never their message hold at most the RPC cap, get a clear
    RESOURCE_EXHAUSTED for the call over it, and are dropped once their connection is too old."""
    release = threading.Event()

    def never() -> Iterator[Any]:
        release.wait(60)
        yield from ()

    channels = [channel(server) for _ in range(3)]
    try:
        stalled = [ch.stream_unary(METHOD + "ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=pb.ModelInferResponse.FromString).future(never())
                   for ch in channels]

        def over_the_cap() -> bool:
            try:
                live(server)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined, no-any-return]
            return False

        assert wait_for(over_the_cap, 30, "the RPC cap to refuse a call")
        # The connection's age (2 s) and grace (1 s) end the stalled calls; nothing waits for ever.
        wait_for(lambda: all(f.done() for f in stalled), 60, "the stalled calls to be dropped")
        for f in stalled:
            assert f.exception() is not None and f.exception().code() != grpc.StatusCode.OK
        assert wait_for(lambda: not over_the_cap() and live(server), 30, "the server to answer again")
    finally:
        release.set()
        for ch in channels:
            ch.close()


def test_a_connection_that_never_speaks_http2_is_closed(server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=30) as s:
        data = b""
        while chunk := s.recv(65536):  # the server's own SETTINGS may come first; then it closes
            data += chunk
    assert live(server)


def test_options_follow_the_settings() -> None:
    options = dict(server_options(SETTINGS))
    assert options["grpc.max_receive_message_length"] == SETTINGS.max_body_bytes
    assert options["grpc.max_metadata_size"] == SETTINGS.max_header_bytes
    assert options["grpc.max_allowed_incoming_connections"] == SETTINGS.max_connections
    assert options["grpc.server_handshake_timeout_ms"] == 1000
    assert options["grpc.max_connection_age_ms"] == 2000 and options["grpc.max_connection_age_grace_ms"] == 1000
    assert options["grpc.max_connection_idle_ms"] == int(SETTINGS.keepalive_timeout_s * 1000)


def test_bad_limits_are_usage_errors() -> None:
    import asyncio

    engine = InferenceEngine(Settings())
    with pytest.raises(UsageError, match="grpc_max_concurrent_rpcs must be positive"):
        asyncio.run(start_grpc(engine, Settings(grpc_max_concurrent_rpcs=0), "127.0.0.1", 0))
