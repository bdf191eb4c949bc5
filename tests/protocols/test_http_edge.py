"""The HTTP/1.1 connection layer against hostile and odd clients, over raw loopback sockets.

Limits counted as bytes arrive (414/431), read deadlines (408) for slow senders, a write deadline
for clients that never read, backpressure on pipelined bytes, a connection cap (503), half-close,
in-order answers when a malformed request follows a valid one, and the header rules.
"""

from __future__ import annotations

import gzip
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from servutil import EchoModel, GatedModel, LiveServer, echo_request, wait_for

from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

X = np.arange(6, dtype=np.float32).reshape(3, 2)
BODY = json.dumps(echo_request(X)).encode()
INFER = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def _echo(engine: InferenceEngine) -> None:
    engine.add_model(EchoModel(), name="echo", version=1)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer(Settings(), _echo) as server:
        yield server


def port(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


def connect(live: LiveServer, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port(live)), timeout=timeout)


def read_all(s: socket.socket, deadline_s: float = 20) -> bytes:
    """Everything the server sends until it closes (or the deadline passes)."""
    end = time.monotonic() + deadline_s
    data = b""
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def statuses(data: bytes) -> list[int]:
    return [int(m) for m in STATUS.findall(data)]


def send_until_answered(s: socket.socket, chunks: Iterator[bytes], deadline_s: float = 30) -> bytes:
    """Send chunk after chunk; stop as soon as the server answers (or the chunks run out)."""
    s.setblocking(False)
    end = time.monotonic() + deadline_s
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            readable, writable, _ = select.select([s], [s], [], max(0.0, end - time.monotonic()))
            if readable:
                try:
                    answer = s.recv(65536)
                except ConnectionResetError:
                    return b"reset"
                s.setblocking(True)
                return answer
            if not writable:
                return b""
            try:
                view = view[s.send(view):]
            except (BlockingIOError, InterruptedError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                return b"reset"
        if time.monotonic() > end:
            return b""
    readable, _, _ = select.select([s], [], [], 5)
    return s.recv(65536) if readable else b""


# -- byte limits, counted as they arrive ------------------------------------------------------------
def test_endless_request_line_is_414_before_the_client_stops(live: LiveServer) -> None:
    with connect(live) as s:
        chunks = iter([b"GET /v2/health/live?q=", *([b"a" * 4096] * 1024)])  # 4 MB of URL, never ended
        answer = send_until_answered(s, chunks)
        assert statuses(answer) == [414], answer[:200]
        assert b'"error"' in answer


def test_endless_header_is_431_before_the_client_stops(live: LiveServer) -> None:
    with connect(live) as s:
        chunks = iter([b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Long: ", *([b"b" * 4096] * 1024)])
        answer = send_until_answered(s, chunks)
        assert statuses(answer) == [431], answer[:200]


def test_many_small_headers_over_the_cap_are_431(live: LiveServer) -> None:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(1000)) + b"\r\n"
    with connect(live) as s:
        answer = send_until_answered(s, iter([head[i:i + 1000] for i in range(0, len(head), 1000)]))
        assert statuses(answer) == [431]


def test_chunked_body_over_the_cap_is_413_while_it_streams() -> None:
    with LiveServer(Settings(max_body_bytes=2048), _echo) as live, connect(live) as s:
        head = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
        answer = send_until_answered(s, iter([head, *([chunk] * 4096)]))  # 4 MB offered, never ended
        assert statuses(answer) == [413], answer[:200]


# -- read and write deadlines ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict() -> Iterator[LiveServer]:
    settings = Settings(header_timeout_s=1.0, body_timeout_s=2.0, write_timeout_s=1.0, keepalive_timeout_s=30)
    with LiveServer(settings, _echo) as server:
        yield server


def trickle(s: socket.socket, data: bytes, deadline_s: float = 20) -> bytes:
    """A slow sender: one byte, then up to 0.25 s waiting for an answer, and again."""
    s.settimeout(0.25)
    end = time.monotonic() + deadline_s
    for i in range(len(data)):
        if time.monotonic() > end:
            break
        try:
            s.sendall(data[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            answer = s.recv(65536)
        except TimeoutError:
            continue
        s.settimeout(10)
        return answer + read_all(s, 5)
    return b""


def test_slow_header_sender_is_408(strict: LiveServer) -> None:
    with connect(strict) as s:
        answer = trickle(s, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"p" * 200 + b"\r\n\r\n")
        assert statuses(answer) == [408], answer[:200]
        assert b"connection: close" in answer


def test_slow_body_sender_is_408(strict: LiveServer) -> None:
    with connect(strict) as s:
        s.sendall(INFER[: INFER.index(b"\r\n\r\n") + 4])
        answer = trickle(s, BODY)
        assert statuses(answer) == [408], answer[:200]


def test_idle_connection_is_not_timed_out_by_the_read_deadlines(strict: LiveServer) -> None:
    with connect(strict) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        # Idle well past the header deadline (a keep-alive connection), then used again.
        s.settimeout(3)
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.settimeout(10)
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_idle_connections_are_closed_even_when_they_trickle_blank_lines() -> None:
    settings = Settings(header_timeout_s=1.0, keepalive_timeout_s=2.0)
    with LiveServer(settings, _echo) as live:
        with connect(live) as fresh:  # never sends a byte: closed after the head deadline
            assert closed_within(fresh, 30)
        with connect(live) as kept:
            kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
            # Blank lines between requests are no request: they do not keep the connection alive.
            kept.settimeout(0.25)
            end = time.monotonic() + 30
            while time.monotonic() < end:
                try:
                    kept.sendall(b"\r\n")
                    if kept.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                raise AssertionError("the connection stayed open for 30 s of blank lines")


def closed_within(s: socket.socket, deadline_s: float) -> bool:
    """Whether the server closes ``s`` (EOF or reset) within the deadline, having sent nothing."""
    s.settimeout(deadline_s)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_client_that_never_reads_is_dropped(strict: LiveServer) -> None:
    raw = np.zeros((1 << 20, 2), dtype=np.float32)  # 8 MB in, 8 MB out: more than any socket buffer
    header = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(raw.shape),
                    "parameters": {"binary_data_size": raw.nbytes}}],
        "parameters": {"binary_data_output": True}}).encode()
    request = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: %d\r\n"
               b"Content-Length: %d\r\n\r\n" % (len(header), len(header) + raw.nbytes)) + header + raw.tobytes()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port(strict)))

    def ours() -> bool:  # the server's side of this very connection is still open
        return any(c.transport is not None and c.transport.get_extra_info("peername") == s.getsockname()
                   for c in list(strict.http.connections))

    try:
        s.sendall(request)
        assert ours()
        # Never read: the server gives up on the write and lets the connection go.
        wait_for(lambda: not ours(), 60, "the stuck connection to be dropped")
    finally:
        s.close()


# -- pipelining -----------------------------------------------------------------------------------
def test_valid_then_malformed_pipelined_both_answered_in_order(live: LiveServer) -> None:
    with connect(live) as s:
        s.sendall(INFER + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        data = read_all(s)
    assert statuses(data) == [200, 400], data[:400]
    assert data.index(b'"model_name"') < data.index(b"HTTP/1.1 400")


def test_half_close_after_the_request_still_gets_the_answer(live: LiveServer) -> None:
    with connect(live) as s:
        s.sendall(INFER + INFER)
        s.shutdown(socket.SHUT_WR)
        data = read_all(s)
    assert statuses(data) == [200, 200], data[:400]
    assert data.count(b'"model_name"') == 2


@pytest.mark.parametrize("close", [b"HTTP/1.0", b"HTTP/1.1\r\nConnection: close"])
def test_an_answer_that_closes_is_a_staged_close(live: LiveServer, close: bytes) -> None:
    """After an answer with ``connection: close`` the server half-closes and drops what the client
    still sends, instead of closing at once: a close with unread input resets the connection, and
    the reset can destroy the answer before the client reads it (seen in the HTTP fuzz test)."""
    request = INFER.replace(b"HTTP/1.1", close, 1)
    with connect(live) as s:
        s.sendall(request)
        data = b""
        while b'"model_name"' not in data or not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert statuses(data) == [200] and b"connection: close" in data.lower()
        # The client goes on sending (it pipelined blindly): a closed socket answers that with a reset.
        s.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 99999\r\n\r\n" + b"x" * 60_000)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # poll for a reset for a while: none may come
            readable, _, _ = select.select([s], [], [], 0.05)
            if readable:
                assert s.recv(65536) == b""  # the half-close only: no more answers, no reset
        s.settimeout(0.2)
        try:
            s.sendall(b"y" * 1000)
        except OSError as exc:  # pragma: no cover - a reset shows here too
            raise AssertionError(f"the connection was reset: {exc}") from exc


def test_pipelined_bytes_are_bounded_and_resume_after_draining() -> None:
    model = GatedModel()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(model, name="gated", version=1)

    body = json.dumps(echo_request(np.zeros((1, 2), dtype=np.float32),
                                   parameters={"pad": "x" * (1 << 20)})).encode()  # 1 MB each
    one = b"POST /v2/models/gated/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with LiveServer(Settings(max_pipelined_bytes=256 * 1024), setup) as live, connect(live) as s:
        s.sendall(one)
        wait_for(lambda: model.entered == 1, 30, "the first request to reach the model")
        # The model holds the first; the client pipelines 40 more (40 MB) and never reads.
        sent, total = 0, one * 40
        s.setblocking(False)
        stalled_since = time.monotonic()
        while sent < len(total) and time.monotonic() - stalled_since < 2:
            _, writable, _ = select.select([], [s], [], 0.2)
            if writable:
                try:
                    n = s.send(memoryview(total)[sent:sent + 65536])
                except BlockingIOError:
                    continue
                sent += n
                stalled_since = time.monotonic()
        # The server stopped reading long before 32 bodies; what was sent sits in socket buffers.
        assert sent < 20 * len(one), sent
        model.gate.set()
        s.setblocking(True)
        s.settimeout(10)
        s.sendall(memoryview(total)[sent:])
        s.shutdown(socket.SHUT_WR)
        data = read_all(s, 60)
    assert statuses(data) == [200] * 41


# -- the connection cap ----------------------------------------------------------------------------
def test_connections_over_the_cap_get_503_with_retry_after() -> None:
    with LiveServer(Settings(max_connections=4), _echo) as live:
        held = [connect(live) for _ in range(4)]
        try:
            wait_for(lambda: len(live.http.connections) >= 4, 30, "four connections")
            with connect(live) as extra:
                extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
                data = read_all(extra)
            assert statuses(data) == [503] and b"retry-after:" in data.lower(), data[:300]
            held.pop().close()
            wait_for(lambda: len(live.http.connections) <= 3, 30, "a slot to free up")
            with connect(live) as again:
                again.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
                assert again.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            for s in held:
                s.close()


# -- header rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /v2/health/live HTTP/1.1\r\n\r\n", 400),
    (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
     400),
    (b"GET /v2/health/live HTTP/1.0\r\n\r\n", 200),
    (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n", 200),
])
def test_host_and_authorization_rules(live: LiveServer, request_bytes: bytes, status: int) -> None:
    with connect(live) as s:
        s.sendall(request_bytes)
        data = read_all(s, 10) if status != 200 else s.recv(4096)
    assert statuses(data)[:1] == [status], data[:300]
    if status == 400:
        assert b'"error"' in data


def test_no_100_continue_for_http_1_0(live: LiveServer) -> None:
    head = b"POST /v2/models/echo/infer HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    with connect(live) as s:
        s.sendall(head + BODY)
        data = read_all(s)
    assert b"100 Continue" not in data and statuses(data) == [200], data[:300]


def test_100_continue_still_sent_to_http_1_1(live: LiveServer) -> None:
    head = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with connect(live) as s:
        s.sendall(head % len(BODY))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(BODY)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("body", [
    gzip.compress(BODY)[:10],  # the header alone: the stream ends at once
    gzip.compress(BODY)[:40],  # cut in the middle
    gzip.compress(BODY)[:10] + b"\xff" * 50,  # garbage after the header
])
def test_corrupt_gzip_is_400_saying_so(live: LiveServer, body: bytes) -> None:
    import httpx

    r = httpx.post(live.url + "/v2/models/echo/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400, r.text
    assert "corrupt" in r.json()["error"] and "empty" not in r.json()["error"]


def test_concurrent_clients_keep_working_next_to_a_slowloris(strict: LiveServer) -> None:
    import httpx

    results: list[int] = []
    with connect(strict) as slow:
        t = threading.Thread(target=lambda: results.append(statuses(trickle(slow, b"GET /" + b"a" * 500))[:1] == [408]))
        t.start()
        with httpx.Client(base_url=strict.url, timeout=10) as c:
            for _ in range(20):
                assert c.post("/v2/models/echo/infer", json=echo_request(X)).status_code == 200
        t.join(30)
    assert results == [True]


def test_limits_must_be_positive() -> None:
    from modelpod.errors import UsageError
    from modelpod.protocols.http import HttpLimits

    with pytest.raises(UsageError, match="max_connections must be positive"):
        HttpLimits.from_settings(Settings.from_env({"MODELPOD_MAX_CONNECTIONS": "0"}))
    assert HttpLimits.from_settings(Settings.from_env({"MODELPOD_HEADER_TIMEOUT_S": "2.5"})).header_timeout_s == 2.5


def test_the_date_header_is_imf_fixdate_as_the_email_package_writes_it() -> None:
    from email.utils import formatdate

    from modelpod.protocols.wire import http_date

    rng = np.random.default_rng(9)
    # leap days, year ends, the epoch, and random seconds across two centuries
    moments = [0.0, 951782400.0, 1330473599.0, 4102444799.0, *rng.uniform(0, 4.1e9, 200).tolist()]
    for when in moments:
        assert http_date(when) == formatdate(when, usegmt=True)
