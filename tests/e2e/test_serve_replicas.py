"""``modelpod serve --isolation process``: kill -9 under load loses nothing, SIGTERM drains, failures say why."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from replica_pods import behave_pod
from servutil import metric_value, modelpod_serve, wait_for

from modelpod.store import PodRecord

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def replica_pids(url: str, model: str) -> list[int]:
    meta = httpx.get(f"{url}/v2/models/{model}", timeout=30).json()
    return [r["pid"] for r in meta.get("replicas", []) if r["state"] in ("idle", "busy")]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def infer_body(name: str, rows: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.reshape(-1).tolist()}]}


def test_kill_9_of_one_of_two_replicas_every_2s_while_32_connections_send(
        served_home: tuple[Path, PodRecord], sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    home, _ = served_home
    estimator = sklearn_model[2]
    rows = np.random.default_rng(11).normal(size=(64, 20)).astype(np.float32)
    expected = estimator.predict(rows).tolist()  # type: ignore[attr-defined]
    with modelpod_serve(home, "lr", "--isolation", "process", "--replicas", "2", "--no-grpc") as server:
        url = server.url
        assert len(server.info["models"][0]["replicas"]["processes"]) == 2  # `serve` prints its replicas
        name = httpx.get(f"{url}/v2/models/lr", timeout=30).json()["inputs"][0]["name"]
        stop = threading.Event()
        lock = threading.Lock()
        counts = {"ok": 0}
        failures: list[str] = []
        seen: set[int] = set()

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set():
                    i = int(rng.integers(len(rows)))
                    try:
                        r = http.post("/v2/models/lr/infer", json=infer_body(name, rows[i:i + 1]))
                        ok = r.status_code == 200 and r.json()["outputs"][0]["data"] == [expected[i]]
                        what = f"{r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, what = False, repr(exc)
                    with lock:
                        if ok:
                            counts["ok"] += 1
                        else:
                            failures.append(what)

        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(32)]
        for t in threads:
            t.start()
        kills = 0
        start = time.monotonic()
        try:
            for tick in range(15):  # one kill every 2 s for 30 s
                time.sleep(max(0.0, start + 2 * tick - time.monotonic()))
                live = replica_pids(url, "lr")
                seen.update(live)
                if not live:  # both are still starting (a slow machine): nothing to kill this time
                    continue
                victim = live[kills % len(live)]
                os.kill(victim, signal.SIGKILL)
                kills += 1
        finally:
            stop.set()
            for t in threads:
                t.join(90)
        assert failures == [], f"{len(failures)} failed of {counts['ok'] + len(failures)}: {failures[:5]}"
        # 15 kills on a quiet machine; fewer where a replacement takes longer than 2 s to start (a busy
        # machine), as a tick with no replica up has nothing to kill.
        assert kills >= 3 and counts["ok"] >= 32 * 10, (kills, counts)
        assert all(gone(p) for p in seen - set(replica_pids(url, "lr")))
        text = httpx.get(f"{url}/metrics", timeout=30).text
        assert metric_value(text, "modelpod_replica_restarts_total", model="lr", reason="killed") >= kills
        assert metric_value(text, "modelpod_requests_total", model="lr", outcome="success") >= counts["ok"]
        final = wait_for(lambda: (p := replica_pids(url, "lr")) and len(p) == 2 and p, 30, "two replicas again")
        seen.update(final)
    assert all(gone(p) for p in seen)  # the server's exit took every replica with it


def test_sigterm_drains_every_replica(tmp_path: Path) -> None:
    home = tmp_path / "home"
    behave_pod(tmp_path, home)
    server = modelpod_serve(home, "behave", "--isolation", "process", "--replicas", "2", "--no-grpc")
    try:
        url = server.url
        children = replica_pids(url, "behave")
        assert len(children) == 2
        # Their template was forked from the server as it started (no interpreter of its own): its parent
        # is the server and its command line the server's.
        (template,) = {parent_of(p) for p in children}
        assert parent_of(template) == server.proc.pid
        assert Path(f"/proc/{template}/cmdline").read_bytes() == Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        results: list[int] = []

        def slow() -> None:
            body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [-6, 1]}]}
            results.append(httpx.post(f"{url}/v2/models/behave/infer", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=slow, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: metric_value(httpx.get(f"{url}/metrics", timeout=30).text, "modelpod_inflight_requests",
                                      model="behave") == 6, 30, "six requests in flight")
        server.signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert results == [200] * 6
        assert server.proc.wait(60) == 0
        wait_for(lambda: all(gone(p) for p in children), 30, "the replicas to exit")
    finally:
        server.stop()


def test_a_model_that_cannot_start_is_failed_with_its_error_and_the_rest_serves(
        tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    from modelpod.api import pack
    from modelpod.store import Store

    home = tmp_path / "home"
    behave_pod(tmp_path, home)
    pack(sklearn_model[0], "lr", store=Store(home), sample=sklearn_model[1])
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({"models": {"behave": {"isolation": "process"}}}))
    with modelpod_serve(home, "lr", "behave", "--config", str(cfg), "--no-grpc",
                        env={"REPLICA_TEST_BREAK": "1", "MODELPOD_LOG_LEVEL": "info"}) as server:
        url = server.url
        models = {m["name"]: m for m in server.info["models"]}
        assert models["behave"]["state"] == "UNAVAILABLE"
        assert "a_module_that_is_not_there" in models["behave"]["reason"]
        r = httpx.get(f"{url}/v2/models/behave/ready", timeout=30)
        assert r.status_code == 503 and "a_module_that_is_not_there" in r.json()["error"]
        assert httpx.get(f"{url}/v2/models/lr/ready", timeout=30).status_code == 200
        body = infer_body(httpx.get(f"{url}/v2/models/lr", timeout=30).json()["inputs"][0]["name"],
                          sklearn_model[1][:1].astype(np.float32))
        assert httpx.post(f"{url}/v2/models/lr/infer", json=body, timeout=30).status_code == 200
        attempts = [json.loads(line) for line in server.stderr if '"msg":"replica could not start"' in line]
        assert len(attempts) == 3  # backed off between them, then failed: no hot loop
