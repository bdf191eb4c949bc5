"""The inference fast path: ``RestApp.begin`` answers through callbacks (no task, no coroutine).

What it must keep from the awaited path: answers in request order on a connection whatever mix of
fast, awaited and refused requests is pipelined; the same bodies, headers and metrics; errors found
before queueing answered at once; a model loaded on demand still loads; a request the batcher
times out or that the model fails is answered; ``Batcher.enqueue`` calls back exactly once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, LiveServer, echo_request, metric_value, wait_for

from modelpod.errors import ModelNotReadyError, OverloadedError
from modelpod.model import Batch
from modelpod.protocols.http import Request, Response
from modelpod.protocols.rest import RestApp
from modelpod.serving.batcher import Batcher
from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.worker import ModelWorker
from modelpod.settings import Settings


def _echo(engine: InferenceEngine) -> None:
    engine.add_model(EchoModel(), name="echo", version=1)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(Settings(), _echo)
    with server:
        yield server


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), len(body), extra)) + body


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()


def responses(s: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` HTTP/1.1 responses (with Content-Length) from ``s``."""
    buf = b""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"the server closed after {len(out)} answers"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers["content-length"])
        while len(buf) < n:
            chunk = s.recv(65536)
            assert chunk, "the server closed inside a body"
            buf += chunk
        out.append((int(lines[0].split()[1]), headers, buf[:n]))
        buf = buf[n:]
    return out


def rows(start: float) -> np.ndarray[Any, Any]:
    return (np.arange(4, dtype=np.float32).reshape(2, 2) + start).astype(np.float32)


def test_pipelined_fast_awaited_and_refused_requests_are_answered_in_order(live: LiveServer) -> None:
    a, b = rows(10), rows(-50)
    sent = [
        post("/v2/models/echo/infer", json.dumps(echo_request(a)).encode(), b"X-Request-ID: first\r\n"),
        get("/v2/models/echo"),  # not inference: the awaited path
        post("/v2/models/nope/infer", json.dumps(echo_request(a)).encode()),  # refused before queueing
        post("/v2/models/echo/infer", b'{"inputs": [1,'),  # malformed JSON
        post("/v2/models/echo/versions/1/infer", json.dumps(echo_request(b)).encode()),
        get("/v2/health/live"),
    ]
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(b"".join(sent))
        got = responses(s, len(sent))
    assert [status for status, _, _ in got] == [200, 200, 404, 400, 200, 200]
    first, second = json.loads(got[0][2]), json.loads(got[4][2])
    assert first["outputs"][0]["data"] == a.reshape(-1).tolist()
    assert second["outputs"][0]["data"] == b.reshape(-1).tolist()
    assert got[0][1]["x-request-id"] == "first" and got[0][1]["modelpod-variant"] == "echo:1"
    assert json.loads(got[1][2])["name"] == "echo"
    assert "nope" in json.loads(got[2][2])["error"] and "error" in json.loads(got[3][2])


def test_many_connections_each_get_their_own_rows(live: LiveServer) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(16)]
    try:
        for i, s in enumerate(socks):  # 16 requests in flight at once: merged into batches
            s.sendall(post("/v2/models/echo/infer", json.dumps(echo_request(rows(100 * i))).encode()) * 2)
        for i, s in enumerate(socks):
            for status, _, body in responses(s, 2):
                assert status == 200
                assert json.loads(body)["outputs"][0]["data"] == rows(100 * i).reshape(-1).tolist()
    finally:
        for s in socks:
            s.close()


def test_a_model_loaded_on_demand_is_loaded_by_the_first_request() -> None:
    with LiveServer(Settings(lazy_load=True), _echo) as server:
        entry = server.engine.resolve("echo", None)
        assert not entry.ready
        import httpx

        r = httpx.post(f"{server.url}/v2/models/echo/infer", json=echo_request(rows(1)), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == rows(1).reshape(-1).tolist()
        assert entry.ready
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert metric_value(text, "modelpod_requests_total", model="echo", outcome="success") == 1


def test_a_timed_out_request_gets_504_and_the_next_one_is_answered() -> None:
    model = GatedModel()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(model, name="gated", version=1, policy=BatchPolicy(timeout_s=0.2, max_batch_wait_ms=0))

    with LiveServer(Settings(), setup) as server, socket.create_connection(
            ("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as s:
        body = json.dumps(echo_request(rows(0))).encode()
        s.sendall(post("/v2/models/gated/infer", body))
        [(status, headers, answer)] = responses(s, 1)
        assert status == 504 and "no answer within" in json.loads(answer)["error"]
        model.gate.set()
        s.sendall(post("/v2/models/gated/infer", body))
        [(status, _, answer)] = responses(s, 1)
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == rows(0).reshape(-1).tolist()


# -- the pieces, on one loop ----------------------------------------------------------------------
def test_begin_takes_inference_only_and_answers_once() -> None:
    async def main() -> None:
        engine = InferenceEngine(Settings())
        _echo(engine)
        await engine.start()
        app = RestApp(engine, Settings())
        answers: list[Response] = []
        done = asyncio.Event()

        def respond(response: Response) -> None:
            answers.append(response)
            done.set()

        body = json.dumps(echo_request(rows(3))).encode()
        req = Request("POST", "/v2/models/echo/infer", "", {"host": "t"}, body, True, 0.0)
        assert app.begin(req, respond) is True
        assert answers == []  # never from inside begin
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0)
        assert len(answers) == 1 and answers[0].status == 200
        assert json.loads(answers[0].body)["outputs"][0]["data"] == rows(3).reshape(-1).tolist()  # type: ignore[arg-type]
        # Not inference: left to the awaited path. A refusal known at once: a Response.
        assert app.begin(Request("GET", "/v2/models/echo", "", {}, b"", True, 0.0), respond) is False
        refused = app.begin(Request("POST", "/v2/models/nope/infer", "", {}, body, True, 0.0), respond)
        assert isinstance(refused, Response) and refused.status == 404
        assert len(answers) == 1

    asyncio.run(main())


def test_enqueue_calls_back_once_and_refuses_when_full() -> None:
    async def main() -> None:
        model = GatedModel()
        b = Batcher(ModelWorker(model, "m"), BatchPolicy(max_batch_rows=8, max_batch_wait_ms=0, max_queue=2))
        calls: list[tuple[Batch | None, BaseException | None]] = []
        b.enqueue({"x": rows(0)}, lambda out, err: calls.append((out, err)))
        await asyncio.wait_for(_until(lambda: model.entered == 1), 30)
        b.enqueue({"x": rows(1)}, lambda out, err: calls.append((out, err)))
        b.enqueue({"x": rows(2)}, lambda out, err: calls.append((out, err)))
        with pytest.raises(OverloadedError):  # two queued behind the running one: full
            b.enqueue({"x": rows(3)}, lambda out, err: calls.append((out, err)))
        model.gate.set()
        await asyncio.wait_for(_until(lambda: len(calls) == 3), 30)
        assert [err for _, err in calls] == [None, None, None]
        assert [out["y"].tolist() for out, _ in calls if out is not None] == [rows(i).tolist() for i in range(3)]
        # The model goes away: what is queued is answered with the reason.
        model.gate.clear()
        b.enqueue({"x": rows(4)}, lambda out, err: calls.append((out, err)))
        await asyncio.wait_for(_until(lambda: model.entered == 3), 30)
        b.enqueue({"x": rows(5)}, lambda out, err: calls.append((out, err)))
        b.close()
        assert isinstance(calls[-1][1], ModelNotReadyError)
        model.gate.set()
        await asyncio.wait_for(_until(lambda: len(calls) == 5), 30)
        assert calls[-1][1] is None and len(calls) == 5

    asyncio.run(main())


def test_a_failing_callback_does_not_lose_its_batch_neighbours() -> None:
    async def main() -> None:
        model = GatedModel()
        b = Batcher(ModelWorker(model, "m"), BatchPolicy(max_batch_rows=8, max_batch_wait_ms=0))
        got: list[Any] = []

        def broken(out: Batch | None, err: BaseException | None) -> None:
            raise RuntimeError("a bug in the caller")

        b.enqueue({"x": rows(0)}, lambda out, err: got.append(out))  # runs alone, held by the gate
        await asyncio.wait_for(_until(lambda: model.entered == 1), 30)
        b.enqueue({"x": rows(1)}, lambda out, err: got.append(out))
        b.enqueue({"x": rows(2)}, broken)
        b.enqueue({"x": rows(3)}, lambda out, err: got.append(out))
        model.gate.set()
        await asyncio.wait_for(_until(lambda: len(got) == 3), 30)
        assert model.batches == [2, 6]  # the three queued ones ran as one batch
        assert [out["y"].tolist() for out in got] == [rows(i).tolist() for i in (0, 1, 3)]
        assert b.inflight == 0

    asyncio.run(main())


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.002)


def test_the_fast_path_counts_as_the_awaited_one(live: LiveServer) -> None:
    import httpx

    before = metric_value(httpx.get(f"{live.url}/metrics", timeout=30).text, "modelpod_requests_total",
                          model="echo", outcome="success")
    for i in range(5):
        assert httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(rows(i)), timeout=30).status_code == 200
    wait_for(lambda: metric_value(httpx.get(f"{live.url}/metrics", timeout=30).text, "modelpod_requests_total",
                                  model="echo", outcome="success") == before + 5, 30, "five more successes counted")
