"""Raw HTTP fuzzing of a real serving process on loopback (hypothesis, a bounded number of examples).

Each example is a byte string built from request lines, headers, framings and bodies, valid and
not, sometimes several pipelined, sometimes plain garbage. It is sent on a fresh connection, which
is then half-closed, and every answer is read until the server closes. Asserted: no answer is a
5xx, the server keeps answering its health check, and its RSS stays bounded.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servutil import ServeProcess, custom_serve

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("MODELPOD_FUZZ_EXAMPLES", "300"))  # more for a deeper run
RSS_GROWTH_LIMIT = 100 * 2**20


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    spec = {"models": [{"kind": "echo", "name": "echo"}, {"kind": "text", "name": "text"}],
            "settings": {"header_timeout_s": 5, "body_timeout_s": 10}}
    with custom_serve(spec) as proc:
        yield proc


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- what a request is made of ----------------------------------------------------------------------
ROUTES = ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/", "/v2/models/echo", "/v2/models/echo/ready",
          "/v2/models/echo/infer", "/v2/models/echo/versions/1/infer", "/v2/models/echo/versions/x/infer",
          "/v2/models/text/infer", "/v2/models/echo/config", "/v2/models/nope/infer", "/v2/repository/index",
          "/v2/repository/models/nope/load", "/metrics", "/", "*", "http://h/v2/health/live", "/v2/models/%ff/infer",
          "/v2/models/echo/versions/%C2%B2/infer", "/v2/models/echo/versions/%D9%A1/infer"]  # "²", "١"
METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "PRI", "CONNECT"])
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTP/1.1", ""])
HEADER_NAMES = ["Host", "Content-Type", "Content-Encoding", "Expect", "Authorization", "Origin", "Connection",
                "Inference-Header-Content-Length", "X-Request-ID", "Transfer-Encoding", "Upgrade", "X-Any"]
HEADER_VALUES = ["t", "application/json", "text/plain", "gzip", "deflate", "br", "100-continue", "Bearer x",
                 "http://evil.example", "close", "keep-alive", "0", "-1", "7", "99999999999999999999", "chunked",
                 "websocket", "", " ", "\u00b2", "12\u00b9"]
TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=40)
DATATYPES = ["FP32", "FP64", "INT8", "INT64", "UINT8", "BOOL", "BYTES", "FP16", "fp32", "FP99", ""]
SCALARS = st.one_of(st.integers(-300, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=5), st.none())
TENSOR = st.fixed_dictionaries({
    "name": st.sampled_from(["x", "text", "zz", ""]),
    "datatype": st.sampled_from(DATATYPES),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.just([1] * 65),
                       st.lists(st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63 - 1, 2**64]), max_size=4)),
    "data": st.one_of(st.lists(SCALARS, max_size=12), st.lists(st.lists(SCALARS, max_size=3), max_size=4), SCALARS),
}, optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "content_type"]), SCALARS)})
OIP = st.fixed_dictionaries({"inputs": st.lists(TENSOR, max_size=3)}, optional={
    "id": st.text(max_size=8),
    "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "batch_rows", "upper", "q"])},
                                              optional={"parameters": st.dictionaries(
                                                  st.sampled_from(["binary_data"]), SCALARS)}), max_size=2),
    "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "x"]), SCALARS)})


def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    OIP.map(_json),
    OIP.map(lambda o: gzip.compress(_json(o))),
    OIP.map(lambda o: gzip.compress(_json(o))[:-9]),
    st.just(b"[" * 100 + b"]" * 100),
)


@st.composite
def one_request(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(METHODS)
    target = draw(st.sampled_from(ROUTES)) + draw(st.one_of(st.just(""), TEXT.map(lambda t: t.replace(" ", "%20"))))
    version = draw(VERSIONS)
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()) or version == "HTTP/1.1":
        headers.append(("Host", draw(st.sampled_from(["t", "127.0.0.1:1", "localhost", "evil.example"]))))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(HEADER_NAMES), TEXT))
        headers.append((name, draw(st.one_of(st.sampled_from(HEADER_VALUES), TEXT))))
    body = draw(BODIES)
    framing = draw(st.sampled_from(["length", "length", "none", "wrong", "chunked", "chunked-bad"]))
    if framing == "length" or (framing == "none" and body):
        headers.append(("Content-Length", str(len(body))))
    elif framing == "wrong":
        headers.append(("Content-Length", str(max(0, len(body) + draw(st.integers(-5, 5))))))
    elif framing.startswith("chunked"):
        headers.append(("Transfer-Encoding", "chunked"))
        body = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if framing == "chunked" else b"zz\r\n" + body
    if draw(st.integers(0, 30)) == 0:  # now and then a head far over the caps
        headers.append(("X-Big", "b" * 70_000))
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return method, head.encode("latin-1", "replace") + body


REQUESTS = st.one_of(
    st.lists(one_request(), min_size=1, max_size=3),
    st.binary(min_size=1, max_size=400).map(lambda b: [("?", b)]),
)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


def answer_statuses(data: bytes, methods: list[str]) -> list[int]:
    """The status of each answer in ``data`` (answers are framed by content-length; HEAD has none)."""
    out: list[int] = []
    i = 0
    while i < len(data):
        m = STATUS_LINE.match(data, i)
        assert m, f"not an HTTP answer at byte {i}: {data[i:i + 80]!r}"
        status = int(m.group(1))
        end = data.index(b"\r\n\r\n", i) + 4
        head = data[i:end].lower()
        i = end
        if status == 100:
            continue
        out.append(status)
        if b"connection: close" in head:
            break
        length = re.search(rb"content-length: (\d+)", head)
        if methods[len(out) - 1] != "HEAD" and length:
            i += int(length.group(1))
    return out


def exchange(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused early and stopped reading (or closed); its answer is still to read
        data = b""
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"the server neither answered nor closed within 20 s; got {data[:200]!r}")


@pytest.mark.timeout(900)
def test_raw_http_fuzz(server: ServeProcess) -> None:
    health = httpx.Client(base_url=server.url, timeout=10)
    for _ in range(20):  # warm the paths up before the baseline
        health.post("/v2/models/echo/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                                              "data": [1, 2]}]})
    baseline = rss(server.proc.pid)
    peak = [baseline]

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(REQUESTS)
    def one(requests: list[tuple[str, bytes]]) -> None:
        data = exchange(server.url, b"".join(raw for _, raw in requests))
        statuses = answer_statuses(data, [m for m, _ in requests])
        assert all(s < 500 for s in statuses), (statuses, data[:600])
        assert health.get("/v2/health/live").status_code == 200
        peak.append(rss(server.proc.pid))

    try:
        one()
    finally:
        health.close()
    assert max(peak) - baseline < RSS_GROWTH_LIMIT, (baseline, max(peak))
    assert server.proc.poll() is None
    assert not [line for line in server.stderr if '"level": "error"' in line or "Traceback" in line]
