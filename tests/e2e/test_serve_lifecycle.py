"""The serving process under stress: batching seen from /metrics, overload, SIGTERM drain, bad pods."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from servutil import PYTHON, REPO, custom_serve, echo_request, metric_value, modelpod_serve, wait_for

from modelpod.store import PodRecord, Store

pytestmark = pytest.mark.e2e


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def test_concurrent_requests_merge_and_each_gets_its_own_rows() -> None:
    spec = {"models": [{"kind": "slow", "name": "m", "args": [0.3],
                        "policy": {"max_batch_rows": 64, "max_batch_wait_ms": 50}}]}
    with custom_serve(spec) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        sizes = [1, 2, 3, 4, 5, 6, 7, 8]
        first = threading.Thread(target=lambda: c.post("/v2/models/m/infer", json=echo_request(np.zeros((1, 2)))))
        first.start()  # occupies the model while the others queue up
        wait_for(lambda: metric_value(scrape(server.url), "modelpod_inflight_requests", model="m") >= 1, 30,
                 "the first request to be in flight")
        inputs = [np.full((n, 2), 10 * i, dtype=np.float32) + np.arange(n)[:, None] for i, n in enumerate(sizes)]
        with ThreadPoolExecutor(len(sizes)) as pool:
            answers = list(pool.map(lambda x: c.post("/v2/models/m/infer", json=echo_request(x)), inputs))
        first.join(60)
        for x, r in zip(inputs, answers, strict=True):
            assert r.status_code == 200, r.text
            y = next(o for o in r.json()["outputs"] if o["name"] == "y")
            assert y["shape"] == list(x.shape) and y["data"] == x.reshape(-1).tolist()
        text = scrape(server.url)
        requests = metric_value(text, "modelpod_batch_requests_sum", model="m")
        batches = metric_value(text, "modelpod_batch_rows_count", model="m")
        assert requests == len(sizes) + 1
        assert metric_value(text, "modelpod_batch_rows_sum", model="m") == sum(sizes) + 1
        assert batches < requests  # merged
        assert metric_value(text, "modelpod_requests_total", model="m", outcome="success") == len(sizes) + 1


def test_overload_at_ten_times_capacity_sheds_fast() -> None:
    timeout_s = 5.0
    spec = {"models": [{"kind": "slow", "name": "m", "args": [0.02],
                        "policy": {"max_batch_rows": 1, "max_queue": 4, "timeout_s": timeout_s}}]}
    clients, per_client = 40, 6  # 4 queued + 1 running is the capacity; 40 at once is ~10x that
    with custom_serve(spec) as server:
        def hammer(_: int) -> list[tuple[int, float, str | None]]:
            out = []
            with httpx.Client(base_url=server.url, timeout=timeout_s * 4) as c:
                for _ in range(per_client):
                    t0 = time.perf_counter()
                    r = c.post("/v2/models/m/infer", json=echo_request(np.zeros((1, 2))))
                    out.append((r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")))
            return out

        with ThreadPoolExecutor(clients) as pool:
            results = [x for batch in pool.map(hammer, range(clients)) for x in batch]
        statuses = {s for s, _, _ in results}
        assert statuses <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        assert all(retry == "1" for s, _, retry in results if s == 503)
        latencies = sorted(t for _, t, _ in results)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < timeout_s  # nothing waited out the timeout: the queue bound did its job
        text = scrape(server.url)
        assert metric_value(text, "modelpod_requests_total", model="m", outcome="overloaded") == sum(
            1 for s, _, _ in results if s == 503)


def test_sigterm_under_load_finishes_in_flight_and_exits_zero() -> None:
    spec = {"models": [{"kind": "slow", "name": "slow", "args": [0.5], "policy": {"max_batch_rows": 1}},
                       {"kind": "echo", "name": "echo"}],
            "settings": {"drain_timeout_s": 60}}
    server = custom_serve(spec)
    try:
        slow: list[int] = []
        background: list[str] = []
        stop = threading.Event()

        def one_slow() -> None:
            r = httpx.post(server.url + "/v2/models/slow/infer", json=echo_request(np.ones((1, 2))), timeout=60)
            slow.append(r.status_code)

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    try:
                        r = c.post("/v2/models/echo/infer", json=echo_request(np.ones((1, 2))))
                        background.append(str(r.status_code))
                    except httpx.TransportError:
                        background.append("closed")  # only once the server went away
                        return

        loaders = [threading.Thread(target=load) for _ in range(3)]
        slows = [threading.Thread(target=one_slow) for _ in range(8)]
        for t in (*loaders, *slows):
            t.start()
        def accepted() -> bool:  # all 8 reached the model's queue, and most are still waiting
            text = scrape(server.url)
            inflight = metric_value(text, "modelpod_inflight_requests", model="slow")
            done = metric_value(text, "modelpod_requests_total", model="slow")
            return inflight + done == 8 and inflight >= 4

        wait_for(accepted, 60, "8 slow requests accepted")
        wait_for(lambda: len(background) > 20, 60, "background load")
        server.signal(signal.SIGTERM)
        wait_for(lambda: _ready_status(server.url) != 200, 30, "readiness to turn false")
        for t in slows:
            t.join(60)
        stop.set()
        for t in loaders:
            t.join(60)
        assert slow == [200] * 8
        assert set(background) <= {"200", "503", "closed"}
        assert "503" in background or "closed" in background
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def _ready_status(url: str) -> int:
    try:
        return httpx.get(url + "/v2/health/ready", timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_failed_load_keeps_others_serving(served_home: tuple[Path, PodRecord], tmp_path: Path,
                                          sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    home, rec = served_home
    tampered = tmp_path / "tampered"
    shutil.copytree(Store(home).open(rec.ref).path, tampered)
    weights = next(p for p in tampered.rglob("*.skops"))
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    (tampered / "modelpod.yaml").write_text((tampered / "modelpod.yaml").read_text().replace("name: lr", "name: lr2"))
    with modelpod_serve(home, "lr", str(tampered), "--no-grpc") as server, httpx.Client(base_url=server.url) as c:
        states = {m["name"]: m for m in server.info["models"]}
        assert states["lr"]["state"] == "READY"
        assert states["lr2"]["state"] == "UNAVAILABLE" and "tampered" in states["lr2"]["reason"]
        assert c.get("/v2/models/lr2/ready").status_code == 503
        assert c.get("/v2/models/lr/ready").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503  # OIP: ready when every model is
        _, sample, _ = sklearn_model
        req = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [5, 20], "data": sample.ravel().tolist()}]}
        assert c.post("/v2/models/lr/infer", json=req).status_code == 200
        r = c.post("/v2/models/lr2/infer", json=req)
        assert r.status_code == 503 and "tampered" in r.json()["error"]


def test_grpc_port_without_grpcio_is_a_one_line_hint(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['grpc'] = None\n"
            "from modelpod.cli import main\n"
            f"sys.exit(main(['--home', {str(tmp_path)!r}, 'serve', 'x', '--grpc-port', '0']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: 'grpcio' is not installed for the gRPC endpoint (--grpc-port): pip install 'modelpod[grpc]'"]


def test_unknown_ref_refuses_to_start(tmp_path: Path) -> None:
    proc = subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(tmp_path), "serve", "nope", "--port", "0",
                           "--no-grpc"], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 2 and "no pod 'nope'" in proc.stderr


def test_human_announcement(served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    proc = subprocess.Popen([str(PYTHON), "-m", "modelpod", "--home", str(home), "serve", "lr", "--port", "0",
                             "--no-grpc"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("modelpod ") and "http://127.0.0.1:" in lines[1]
        assert "lr:1" in lines[2] and "READY" in lines[2] and "/v2/models/lr" in lines[2]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        if proc.stdout is not None:
            proc.stdout.close()


