"""tritonclient (http and grpc; JSON and binary; sync and async) against a real ``modelpod serve``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import ServeProcess, metric_value, modelpod_serve

from modelpod.store import PodRecord

pytestmark = pytest.mark.e2e
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def server(served_home: tuple[Path, PodRecord]) -> Iterator[ServeProcess]:
    home, _ = served_home
    with modelpod_serve(home, "lr", "--grpc-port", "0") as proc:
        yield proc


@pytest.fixture(scope="module")
def expected(sklearn_model: tuple[Path, np.ndarray, Any]) -> tuple[np.ndarray, np.ndarray]:
    _, sample, est = sklearn_model
    x = np.ascontiguousarray(sample, dtype=np.float32)
    return x, est.predict(x)


def host(url: str) -> str:
    return url.removeprefix("http://")


def test_announces_where_it_listens(server: ServeProcess) -> None:
    assert server.url.startswith("http://127.0.0.1:") and server.grpc and server.grpc.startswith("127.0.0.1:")
    assert server.info["models"][0]["name"] == "lr" and server.info["models"][0]["state"] == "READY"


@pytest.mark.parametrize("binary", [False, True])
def test_http_sync(server: ServeProcess, expected: tuple[np.ndarray, np.ndarray], binary: bool) -> None:
    x, y = expected
    client = httpclient.InferenceServerClient(host(server.url))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lr")
        assert client.get_server_metadata()["name"] == "modelpod"
        meta = client.get_model_metadata("lr", model_version="1")
        assert meta["inputs"][0] == {"name": "input-0", "datatype": "FP32", "shape": [-1, 20]}
        config = client.get_model_config("lr")
        assert config["max_batch_size"] > 0 and config["input"][0]["dims"] == [20]
        inp = httpclient.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("output-0", binary_data=binary)
        result = client.infer("lr", [inp], outputs=[out], request_id="tc-1", model_version="production")
        np.testing.assert_array_equal(result.as_numpy("output-0"), y)
        assert result.get_response()["id"] == "tc-1"
        # No outputs named: the client asks for all of them in binary.
        result = client.infer("lr", [inp])
        np.testing.assert_array_equal(result.as_numpy("output-0"), y)
    finally:
        client.close()


def test_http_compression(server: ServeProcess, expected: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = expected
    client = httpclient.InferenceServerClient(host(server.url))
    try:
        inp = httpclient.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for algorithm in ("gzip", "deflate"):
            result = client.infer("lr", [inp], request_compression_algorithm=algorithm)
            np.testing.assert_array_equal(result.as_numpy("output-0"), y)
    finally:
        client.close()


def test_http_errors_reach_the_client(server: ServeProcess) -> None:
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(host(server.url))
    try:
        inp = httpclient.InferInput("input-0", [1, 3], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException, match="shape"):
            client.infer("lr", [inp])
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("nope")
    finally:
        client.close()


def test_http_repository(server: ServeProcess) -> None:
    client = httpclient.InferenceServerClient(host(server.url))
    try:
        index = client.get_model_repository_index()
        assert {"name": "lr", "version": "1", "state": "READY"} in index
        client.unload_model("lr")
        assert not client.is_model_ready("lr")
        client.load_model("lr")
        assert client.is_model_ready("lr")
    finally:
        client.close()


def test_http_async(server: ServeProcess, expected: tuple[np.ndarray, np.ndarray]) -> None:
    import tritonclient.http.aio as aioclient

    x, y = expected

    async def run() -> None:
        client = aioclient.InferenceServerClient(host(server.url))
        try:
            assert await client.is_server_ready()
            inp = aioclient.InferInput("input-0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            results = await asyncio.gather(*(client.infer("lr", [inp]) for _ in range(8)))
            for r in results:
                np.testing.assert_array_equal(r.as_numpy("output-0"), y)
        finally:
            await client.close()

    asyncio.run(run())


def test_grpc_sync(server: ServeProcess, expected: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = expected
    assert server.grpc is not None
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lr")
        assert client.get_server_metadata().name == "modelpod"
        meta = client.get_model_metadata("lr", as_json=True)
        assert meta["inputs"][0]["datatype"] == "FP32"
        inp = grpcclient.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("lr", [inp], outputs=[grpcclient.InferRequestedOutput("output-0")], request_id="g1",
                              model_version="1")
        np.testing.assert_array_equal(result.as_numpy("output-0"), y)
        assert result.get_response().id == "g1"
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("nope", [inp])
    finally:
        client.close()


def test_grpc_async(server: ServeProcess, expected: tuple[np.ndarray, np.ndarray]) -> None:
    import tritonclient.grpc.aio as aioclient

    x, y = expected
    assert server.grpc is not None
    grpc_url = server.grpc

    async def run() -> None:
        client = aioclient.InferenceServerClient(grpc_url)
        try:
            assert await client.is_server_live()
            inp = aioclient.InferInput("input-0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            results = await asyncio.gather(*(client.infer("lr", [inp]) for _ in range(8)))
            for r in results:
                np.testing.assert_array_equal(r.as_numpy("output-0"), y)
        finally:
            await client.close()

    asyncio.run(run())


def test_metrics_scrape_passes_promtool(server: ServeProcess) -> None:
    from test_metrics import promtool_check  # tests/serving is on sys.path (tests/conftest.py)

    text = httpx.get(server.url + "/metrics", timeout=30).content
    promtool_check(text)
    assert metric_value(text.decode(), "modelpod_requests_total", model="lr", protocol="grpc", outcome="success") > 0
    assert metric_value(text.decode(), "modelpod_model_memory_bytes", model="lr") > 0
