"""The repository API (load/unload) on loopback without a token: no web page may drive it.

A page on another origin can send simple cross-origin POSTs (text/plain, forms, no preflight), and
a DNS-rebinding page reaches 127.0.0.1 under its own host name. Both are refused; the server's own
origin, plain clients (tritonclient sends no Content-Type) and a valid token are not.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from servutil import EchoModel, LiveServer

from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings


def _echo(engine: InferenceEngine) -> None:
    engine.add_model(EchoModel(), name="echo", version=1)


@pytest.fixture
def live() -> Iterator[LiveServer]:
    with LiveServer(Settings(), _echo) as server:
        yield server


def ready(live: LiveServer) -> bool:
    return httpx.get(live.url + "/v2/models/echo/ready").status_code == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Host": "evil.example:8080"},  # DNS rebinding: the page's own name now points at 127.0.0.1
    {"Host": "127.0.0.1.evil.example"},
])
def test_foreign_origin_or_host_is_refused(live: LiveServer, headers: dict[str, str]) -> None:
    r = httpx.post(live.url + "/v2/repository/models/echo/unload", headers=headers)
    assert r.status_code == 403, r.text
    assert "error" in r.json()
    assert ready(live)  # nothing changed


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_non_json_bodies_are_415(live: LiveServer, content_type: str) -> None:
    r = httpx.post(live.url + "/v2/repository/models/echo/unload", content=b"{}",
                   headers={"Content-Type": content_type})
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]
    assert ready(live)


def test_own_origin_json_and_plain_clients_are_served(live: LiveServer) -> None:
    host = live.url.removeprefix("http://")
    own = {"Origin": live.url, "Content-Type": "application/json"}
    assert httpx.post(live.url + "/v2/repository/models/echo/unload", json={}, headers=own).status_code == 200
    assert not ready(live)
    # localhost names the server as well as 127.0.0.1 does; no Content-Type (as tritonclient sends).
    local = {"Host": "localhost:" + host.rsplit(":", 1)[1]}
    assert httpx.post(live.url + "/v2/repository/models/echo/load", content=b"{}", headers=local).status_code == 200
    assert ready(live)


def test_a_valid_token_is_needed_and_then_enough() -> None:
    with LiveServer(Settings(token="s3cret"), _echo) as live:
        foreign = {"Origin": "http://evil.example", "Host": "evil.example"}
        assert httpx.post(live.url + "/v2/repository/models/echo/unload", headers=foreign).status_code == 401
        ok = {**foreign, "Authorization": "Bearer s3cret"}
        assert httpx.post(live.url + "/v2/repository/models/echo/unload", headers=ok).status_code == 200
        assert not ready(live)
        # Bodies are JSON only, token or not.
        r = httpx.post(live.url + "/v2/repository/models/echo/load", content=b"{}",
                       headers={**ok, "Content-Type": "text/plain"})
        assert r.status_code == 415


def test_inference_is_not_affected_by_the_guard(live: LiveServer) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    r = httpx.post(live.url + "/v2/models/echo/infer", json=body, headers={"Origin": "http://evil.example"})
    assert r.status_code == 200


def test_routes_and_feedback_refuse_a_foreign_page() -> None:
    from traffic_util import Offset, route_server
    from traffic_util import body as infer_body

    split = {"churn": {"variants": [{"model": "churn:2", "weight": 1}]}}
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, split) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        foreign = {"Origin": "http://evil.example"}
        change = {"variants": [{"model": "churn:3", "weight": 1}]}
        assert c.put("/v2/routes/churn", json=change, headers=foreign).status_code == 403
        assert c.put("/v2/routes/churn", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
        assert c.get("/v2/routes/churn").json()["variants"] == split["churn"]["variants"]  # unchanged
        answer = c.post("/v2/models/churn/infer", json=infer_body()).json()
        feedback = {"id": answer["id"], "reward": 0.0}
        assert c.post("/v2/models/churn/feedback", json=feedback, headers=foreign).status_code == 403
        assert c.post("/v2/models/churn/feedback", json=feedback).status_code == 200
