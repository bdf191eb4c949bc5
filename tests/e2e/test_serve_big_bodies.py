"""Health checks keep answering while a real server decodes a request of maximum size.

Each case sends one big body to a real server process and, until its answer arrives, probes
``/v2/health/live`` in a loop. A probe counts as answered when it gets its 200 within a generous
deadline (the goal is 100 ms; ``DEADLINE_S`` leaves room for a loaded test machine); the test
asserts that every probe was answered. It never asserts how fast anything was.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from servutil import ServeProcess, custom_serve

pytestmark = pytest.mark.e2e

DEADLINE_S = 2.0
MAX_BODY = 64 * 1024 * 1024  # the default body cap: every case stays just under it


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    spec = {"models": [{"kind": "echo", "name": "echo"}, {"kind": "text", "name": "text"}], "grpc": "off"}
    with custom_serve(spec) as proc:
        yield proc


def many_inputs() -> tuple[str, bytes, dict[str, str]]:
    """10^6 inputs for a one-input model (refused before any of them is decoded)."""
    body = orjson.dumps({"inputs": [{"name": f"x{i}", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
                                    for i in range(10**6)]})
    return "echo", body, {}


def big_tensor() -> tuple[str, bytes, dict[str, str]]:
    """One FP32 tensor of about 57 MB of JSON, answered in binary (a valid request, served)."""
    x = np.random.default_rng(0).random((1_450_000, 2), dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                     "data": x.reshape(-1).tolist()}],
                         "parameters": {"binary_data_output": True}})
    return "echo", body, {}


def gzip_tensor() -> tuple[str, bytes, dict[str, str]]:
    """Nested rows, gzip-compressed, inflating to about 63 MB."""
    x = np.random.default_rng(1).random((1_600_000, 2), dtype=np.float32)
    raw = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}],
                        "parameters": {"binary_data_output": True}})
    assert len(raw) < MAX_BODY
    return "echo", gzip.compress(raw, 1), {"content-encoding": "gzip"}


def many_strings() -> tuple[str, bytes, dict[str, str]]:
    """21 M strings; the last element is a number, so it is refused once all are decoded."""
    n = 21_000_000
    data: list[Any] = [""] * n
    data[-1] = 1
    return "text", orjson.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n], "data": data}]}), {}


def probe_while(url: str, busy: threading.Event) -> tuple[int, int]:
    """Probe liveness until ``busy`` clears: (answered in time, not answered in time)."""
    answered = missed = 0
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
        while busy.is_set():
            try:
                ok = client.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:
                ok = False
            answered, missed = (answered + 1, missed) if ok else (answered, missed + 1)
    return answered, missed


@pytest.mark.parametrize("make, status", [
    (many_inputs, 400), (big_tensor, 200), (gzip_tensor, 200), (many_strings, 400),
], ids=["1e6-inputs", "57MB-tensor", "gzip-63MB", "21M-strings"])
def test_health_answers_while_a_maximum_request_is_decoded(
        server: ServeProcess, make: Callable[[], tuple[str, bytes, dict[str, str]]], status: int) -> None:
    model, body, headers = make()
    assert len(body) < MAX_BODY
    busy = threading.Event()
    busy.set()
    counts: list[tuple[int, int]] = []
    prober = threading.Thread(target=lambda: counts.append(probe_while(server.url, busy)), daemon=True)
    with httpx.Client(base_url=server.url, timeout=600) as client:
        prober.start()
        try:
            r = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        finally:
            busy.clear()
            prober.join(60)
    answered, missed = counts[0]
    assert missed == 0, f"{missed} of {answered + missed} health checks went unanswered for {DEADLINE_S}s"
    assert answered >= 1
    assert r.status_code == status, r.text[:300]
    if status == 400:
        assert "objects" in r.json()["error"] or "strings" in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/live", timeout=DEADLINE_S).status_code == 200
