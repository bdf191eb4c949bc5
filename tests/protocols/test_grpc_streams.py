"""Many calls on one gRPC connection: every stream is answered, an overload is answered with a
retry hint, and grpc core's rapid-reset defence (streams counted until the server frees them) is on."""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, LiveServer, wait_for

from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

grpc = pytest.importorskip("grpc")
from grpc import aio  # noqa: E402

from modelpod.protocols._generated import open_inference_pb2 as pb  # noqa: E402
from modelpod.protocols.grpc import server_options  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
CALLS = 300


def row_request(model: str, i: int) -> Any:
    req = pb.ModelInferRequest(model_name=model, id=f"r{i}")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(np.array([[i, -i]], dtype=np.float32).tobytes())
    return req


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    def setup(engine: InferenceEngine) -> None:
        # A queue longer than the calls sent: what is tested is the transport, not the queue bound.
        engine.add_model(EchoModel(), name="echo", version=1, policy=BatchPolicy(max_queue=4 * CALLS))

    with LiveServer(Settings(), setup, grpc=True) as live:  # the default stream and RPC limits
        yield live


def test_hundreds_of_concurrent_calls_on_one_channel_are_all_answered(server: LiveServer) -> None:
    """300 calls at once over one grpc.aio channel (one HTTP/2 connection), three rounds: each gets
    its own row back. With 100 streams per connection, grpc core refused a third of them
    (RST_STREAM REFUSED_STREAM): the server frees a stream a loop turn after the client saw it end."""

    async def rounds() -> list[Counter[str]]:
        async with aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = channel.unary_unary(METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)

            async def one(i: int) -> str:
                try:
                    resp = await call(row_request("echo", i), timeout=120)
                except aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}"
                y = next(k for k, o in enumerate(resp.outputs) if o.name == "y")
                got = np.frombuffer(resp.raw_output_contents[y], dtype="<f4").tolist()
                return "ok" if resp.id == f"r{i}" and got == [i, -i] else f"wrong answer {resp.id} {got}"

            return [Counter(await asyncio.gather(*(one(i) for i in range(CALLS)))) for _ in range(3)]

    for outcome in asyncio.run(rounds()):
        assert outcome == Counter({"ok": CALLS}), outcome


def test_tritonclient_async_calls_on_one_client_are_all_answered(server: LiveServer) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    results: dict[int, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def callback(i: int, result: Any, error: Any) -> None:
        with lock:
            results[i] = error if error is not None else result.as_numpy("y")
            if len(results) == CALLS:
                done.set()

    try:
        for i in range(CALLS):
            x = grpcclient.InferInput("x", [1, 2], "FP32")
            x.set_data_from_numpy(np.array([[i, -i]], dtype=np.float32))
            client.async_infer("echo", [x], callback=functools.partial(callback, i), client_timeout=120)
        assert done.wait(120), f"{len(results)} of {CALLS} answered"
    finally:
        client.close()
    wrong = {i: r for i, r in results.items() if not isinstance(r, np.ndarray) or r.tolist() != [[i, -i]]}
    assert not wrong, list(wrong.items())[:3]


def test_an_overload_is_answered_with_a_retry_hint() -> None:
    """More calls than the model's queue holds: the ones over it are UNAVAILABLE at once, with
    retry-after, grpc-retry-pushback-ms and a google.rpc.RetryInfo; the rest are answered."""
    from google.rpc import error_details_pb2, status_pb2

    model = GatedModel()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(model, name="gated", version=1, policy=BatchPolicy(max_batch_rows=1, max_queue=4))

    calls = 40
    with LiveServer(Settings(), setup, grpc=True) as live, \
            grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        try:
            futures = [call.future(row_request("gated", i), timeout=120) for i in range(calls)]
            # One call in predict, four queued: every other one is refused without waiting for them.
            wait_for(lambda: sum(f.done() for f in futures) == calls - 5, 60, "the calls over the queue")
        finally:
            model.gate.set()
        outcomes: Counter[str] = Counter()
        for f in futures:
            err = f.exception(120)
            if err is None:
                outcomes["ok"] += 1
                continue
            outcomes[err.code().name] += 1
            trailers = dict(err.trailing_metadata())
            assert int(trailers["retry-after"]) >= 1 and int(trailers["grpc-retry-pushback-ms"]) >= 1000
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            info = error_details_pb2.RetryInfo()
            assert status.code == grpc.StatusCode.UNAVAILABLE.value[0] and status.details[0].Unpack(info)
            assert info.retry_delay.ToNanoseconds() > 0 and "overloaded" in err.details()
    assert outcomes == Counter({"ok": 5, "UNAVAILABLE": calls - 5})


# -- rapid reset ---------------------------------------------------------------------------------
def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, plain (not Huffman-coded) strings."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


class _Frames:
    """Reads the server's frames on a raw socket: SETTINGS seen, RST_STREAM error codes by count."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.settings = threading.Event()
        self.resets: Counter[int] = Counter()
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                buf += chunk
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind, flags, payload = buf[3], buf[4], buf[9:9 + length]
                    buf = buf[9 + length:]
                    if kind == 4 and not flags & 1:
                        self.settings.set()
                    elif kind == 3:
                        self.resets[int.from_bytes(payload[:4], "big")] += 1
        except OSError:
            pass
        finally:
            self.closed.set()


def test_streams_reset_as_fast_as_they_open_are_refused() -> None:
    """HEADERS, DATA and RST_STREAM for stream after stream on one connection (CVE-2023-44487):
    the server refuses new streams (REFUSED_STREAM) while the reset ones are still held, instead of
    taking work without bound, and keeps answering."""
    options = dict(server_options(Settings()))
    assert options.get("grpc.http.overload_protection", 1) != 0  # the defence is grpc core's default

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    with LiveServer(Settings(grpc_max_concurrent_streams=16), setup, grpc=True) as live:
        body = row_request("echo", 1).SerializeToString()
        message = b"\x00" + struct.pack(">I", len(body)) + body
        head = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"), ("te", "trailers")))
        with socket.create_connection(("127.0.0.1", live.grpc_port), timeout=30) as sock:
            frames = _Frames(sock)
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
            assert frames.settings.wait(30), "no SETTINGS from the server"
            sock.sendall(_frame(4, 1, 0, b""))  # ack them: streams are taken only after the ack
            stream = 1
            for _ in range(200):  # at most 200 bursts of 100 streams, until the server refuses some
                burst = b""
                for _ in range(100):
                    burst += (_frame(1, 4, stream, head) + _frame(0, 1, stream, message)
                              + _frame(3, 0, stream, struct.pack(">I", 8)))  # 8: CANCEL
                    stream += 2
                sock.sendall(burst)
                if frames.resets[7] or frames.closed.is_set():
                    break
            wait_for(lambda: frames.resets[7] or frames.closed.is_set(), 30, "a refused stream")
            assert frames.resets[7] > 0, (stream // 2, dict(frames.resets))
        with grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
            call = channel.unary_unary(METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            assert call(row_request("echo", 7), timeout=60).id == "r7"
