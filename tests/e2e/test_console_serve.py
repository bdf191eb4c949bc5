"""``modelpod serve --console`` as a real process: the flag (and MODELPOD_CONSOLE) turns the page
on, the JSON start line names it, the sampler fills the history, and without it /console is 404."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from servutil import modelpod_serve, wait_for

from modelpod.store import PodRecord

pytestmark = pytest.mark.e2e


def test_serve_console_flag(served_home: tuple[Path, PodRecord]) -> None:
    home, rec = served_home
    with modelpod_serve(home, "lr", "--console", "--no-grpc") as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as c:
        assert proc.info["console"] == f"{proc.url}/console"
        page = c.get("/console")
        assert page.status_code == 200 and "<title>modelpod console</title>" in page.text
        meta = c.get("/v2/models/lr").json()
        body = {"inputs": [{"name": meta["inputs"][0]["name"], "datatype": "FP32", "shape": [1, 20],
                            "data": [0.5] * 20}]}
        for _ in range(3):
            assert c.post("/v2/models/lr/infer", json=body).status_code == 200
        label = f"lr:{rec.version}"

        def counted() -> bool:
            points = c.get("/console/api/metrics").json()["points"]
            return sum(p["series"].get(label, {}).get("requests_per_s", 0) for p in points) > 0
        wait_for(counted, 60, "the sampler to see the requests")
        models = c.get("/console/api/overview").json()["models"]
        assert any(m["label"] == label and m["state"] == "READY" for m in models)


def test_console_is_off_by_default_and_on_with_the_environment(served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    with modelpod_serve(home, "lr", "--no-grpc") as proc:
        assert "console" not in proc.info
        r = httpx.get(f"{proc.url}/console", timeout=30)
        assert r.status_code == 404 and r.json()["error"]
    with modelpod_serve(home, "lr", "--no-grpc", env={"MODELPOD_CONSOLE": "1"}) as proc:
        assert httpx.get(f"{proc.url}/console/api/overview", timeout=30).status_code == 200
