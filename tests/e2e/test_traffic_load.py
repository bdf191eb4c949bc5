"""A real ``modelpod serve`` under 64 concurrent connections while its routes change under it.

For 30 s (bounded): weights change every second, a variant is added (hot loaded from the store) and
removed, then a full rollout hot loads the new version, and the old versions are unloaded. Counted,
not timed: zero non-2xx answers and zero connection errors.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import modelpod_serve

from modelpod.store import Store

pytestmark = pytest.mark.e2e
CONNECTIONS = 64
DURATION_S = 30.0


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with ``lr`` versions 1, 2 and 3: LogisticRegressions on different synthetic data."""
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    from modelpod.api import pack

    home = tmp_path_factory.mktemp("traffic-home")
    store = Store(home)
    work = tmp_path_factory.mktemp("traffic-models")
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(200, 20)).astype(np.float32)
        y = (x[:, seed] > 0).astype(np.int64)
        path = work / f"m{seed}.skops"
        sio.dump(LogisticRegression().fit(x, y), path)
        rec = pack(path, "lr", store=store, sample=x[:2])
        assert rec.version == seed
    return home


async def _load(url: str, stop: asyncio.Event, seen: Counter[str]) -> None:
    x = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 20], "data": [0.25] * 20}]}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1)) as c:
        while not stop.is_set():
            try:
                r = await c.post("/v2/models/lr/infer", json=x)
            except httpx.TransportError as exc:
                seen[f"connection error: {type(exc).__name__}"] += 1
                continue
            seen[str(r.status_code)] += 1
            if r.status_code == 200:
                seen[r.headers["modelpod-variant"]] += 1
            else:
                seen[f"{r.status_code}: {r.text[:200]}"] += 1


async def _control(url: str, log: list[str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def put(variants: dict[str, float]) -> None:
            spec = {"variants": [{"model": m, "weight": w} for m, w in variants.items()]}
            r = await c.put("/v2/routes/lr", json=spec)
            assert r.status_code == 200, r.text
            log.append(f"{time.monotonic():.1f} put {variants}")

        async def tick() -> None:
            await asyncio.sleep(1.0)  # the scenario's own pace: one change a second

        for w in (70, 30, 50, 90, 10, 60):
            await put({"lr:1": w, "lr:2": 100 - w})
            await tick()
        await put({"lr:1": 40, "lr:2": 30, "lr:3": 30})  # lr:3 is not served yet: loaded first
        await tick()
        for w in (20, 60):
            await put({"lr:1": w, "lr:2": 30, "lr:3": 70 - w})
            await tick()
        await put({"lr:1": 50, "lr:2": 50})  # remove a variant
        r = await c.post("/v2/repository/models/lr/versions/3/unload")
        assert r.status_code == 200, r.text
        await tick()
        await put({"lr:1": 100})
        r = await c.post("/v2/routes/lr/rollout", json={"to": "lr:3", "steps": [25, 50, 100], "every": "2s",
                                                         "min_requests": 20, "max_error_rate": 0.01})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while True:
            shown = (await c.get("/v2/routes/lr")).json()
            if shown["rollout"]["state"] != "running" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        assert shown["rollout"]["state"] == "completed", shown
        for version in (1, 2):
            r = await c.post(f"/v2/repository/models/lr/versions/{version}/unload")
            assert r.status_code == 200, r.text
        index = (await c.post("/v2/repository/index", json={})).json()
        return {"shown": shown, "index": index}


def test_64_connections_through_weight_changes_a_variant_added_and_removed_and_a_full_rollout(
        three_versions: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("routes:\n  lr:\n    variants:\n      - {model: 'lr:1', weight: 70}\n"
                      "      - {model: 'lr:2', weight: 30}\n")
    with modelpod_serve(three_versions, "--config", str(config), "--no-grpc") as proc:
        assert sorted(m["version"] for m in proc.info["models"]) == ["1", "2"]

        async def scenario() -> tuple[Counter[str], dict[str, Any], list[str]]:
            seen: Counter[str] = Counter()
            stop = asyncio.Event()
            log: list[str] = []
            loaders = [asyncio.create_task(_load(proc.url, stop, seen)) for _ in range(CONNECTIONS)]
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(_control(proc.url, log), 120)
                remaining = DURATION_S - (time.monotonic() - started)
                if remaining > 0:
                    await asyncio.sleep(remaining)  # keep the load on for the rest of the 30 s
            finally:
                stop.set()
                await asyncio.gather(*loaders)
            return seen, result, log

        seen, result, log = asyncio.run(scenario())
    bad = {k: v for k, v in seen.items() if not (k == "200" or k.startswith("lr:"))}
    assert bad == {}, (bad, log)
    assert seen["200"] >= CONNECTIONS * 10
    assert seen["lr:1"] and seen["lr:2"] and seen["lr:3"]
    assert result["shown"]["variants"] == [{"model": "lr:3", "weight": 100}]
    states = {r["version"]: r["state"] for r in result["index"] if r["name"] == "lr"}
    assert states == {"1": "UNAVAILABLE", "2": "UNAVAILABLE", "3": "READY"}
