"""The console's JSON endpoints and its guards, in-process: a real HTTP server on loopback with the
console in front of the REST app, and a history sampled by hand on an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import EchoModel, LiveServer, PoisonModel, echo_request

from modelpod.console import ConsoleApp, History
from modelpod.console.history import bucket_quantile
from modelpod.protocols.http import Request
from modelpod.protocols.rest import RestApp
from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

TOKEN = "s3cret-console-token"
ROWS = np.array([[1.0, 2.0]], dtype=np.float32)


class Crash(EchoModel):
    """Fails every batch with an error of its own (a 500, not the client's fault)."""

    def predict(self, inputs: Any) -> Any:
        raise RuntimeError("the model broke")


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _setup(routes: dict[str, Any] | None = None) -> Callable[[InferenceEngine], None]:
    def setup(engine: InferenceEngine) -> None:
        engine.config = ServeConfig.from_settings(engine.settings, {"routes": routes or {}})
        policy = BatchPolicy(max_batch_rows=16, max_batch_wait_ms=0.5)
        engine.add_model(EchoModel(), name="echo", version=1, policy=policy)
        engine.add_model(EchoModel(), name="echo", version=2, policy=policy)
        engine.add_model(PoisonModel(), name="poison", version=1, policy=policy)
        engine.add_model(Crash(), name="crash", version=1, policy=policy)
    return setup


class Console:
    """A live server with the console, its app, and the fake clock of its history."""

    def __init__(self, live: LiveServer, clock: Clock) -> None:
        self.live = live
        self.clock = clock

    @property
    def url(self) -> str:
        return self.live.url

    @property
    def app(self) -> ConsoleApp:
        assert isinstance(self.live.handler, ConsoleApp)
        return self.live.handler

    def sample(self) -> dict[str, Any]:
        """Advance the clock one second and take one point, on the server's loop."""
        self.clock.t += 1.0

        async def take() -> dict[str, Any]:
            return self.app.history.sample()
        return self.live.call(take)


def _console(token: str | None = None, routes: dict[str, Any] | None = None) -> Console:
    settings = Settings(token=token, console=True)
    clock = Clock()

    def wrap(rest: RestApp, engine: InferenceEngine) -> ConsoleApp:
        return ConsoleApp(rest, engine, settings, history=History(engine, interval_s=3600, clock=clock))

    return Console(LiveServer(settings, _setup(routes), wrap=wrap), clock)


@pytest.fixture
def console() -> Iterator[Console]:
    c = _console()
    with c.live:
        yield c


@pytest.fixture
def guarded() -> Iterator[Console]:
    c = _console(TOKEN)
    with c.live:
        yield c


def test_bucket_quantile_interpolates_inside_the_bucket() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert bucket_quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(0.15)
    assert bucket_quantile(bounds, [10, 0, 0, 0], 0.99) == pytest.approx(0.099)
    assert bucket_quantile(bounds, [0, 0, 0, 4], 0.5) == 0.4  # +Inf bucket: its lower bound
    assert bucket_quantile(bounds, [0, 0, 0, 0], 0.5) is None


def test_page_and_static_files_without_a_cdn(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        page = c.get("/console")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http-equiv", "")  # every asset comes from this server
        for asset, kind in (("console.js", "javascript"), ("console.css", "css"), ("login.js", "javascript")):
            r = c.get(f"/console/static/{asset}")
            assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 100
        assert c.get("/console/static/../app.py").status_code == 404
        # The API is untouched behind it.
        assert c.post("/v2/models/echo/infer", json=echo_request(ROWS)).status_code == 200


def test_overview_lists_models_versions_and_state(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        body = c.get("/console/api/overview").json()
        assert c.get("/console/api/models").json() == {"models": body["models"]}
        assert c.get("/console/api/routes").json() == {"routes": []}
    assert body["server"]["ready"] is True and body["console"]["auth"] == "loopback"
    rows = {m["label"]: m for m in body["models"]}
    assert set(rows) == {"echo:1", "echo:2", "poison:1", "crash:1"}
    assert rows["echo:2"]["state"] == "READY" and rows["echo:2"]["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert body["routes"] == [] and body["sections"] == []


def test_history_counts_requests_errors_latency_and_batches(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        for _ in range(5):
            assert c.post("/v2/models/echo/versions/1/infer", json=echo_request(ROWS)).status_code == 200
        # A body the decoder refuses names no model and counts nowhere; a model refusing its input does.
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
        assert c.post("/v2/models/echo/versions/1/infer", json=bad).status_code == 400
        for _ in range(2):
            assert c.post("/v2/models/poison/infer", json=echo_request(-ROWS)).status_code == 400
        assert c.post("/v2/models/crash/infer", json=echo_request(ROWS)).status_code == 500
        point = console.sample()
        s = point["series"]["echo:1"]
        assert s["requests_per_s"] == pytest.approx(5.0) and s["errors_per_s"] == 0
        assert point["series"]["poison:1"]["errors_per_s"] == pytest.approx(2.0)
        assert point["series"]["crash:1"]["requests_per_s"] == pytest.approx(1.0)
        assert s["latency_p50_s"] is not None and 0 < s["latency_p50_s"] <= s["latency_p99_s"]
        assert s["batch_rows"] == pytest.approx(1.0) and s["batches_per_s"] == pytest.approx(5.0)
        assert point["series"]["echo:2"]["requests_per_s"] == 0 and point["series"]["echo:2"]["latency_p50_s"] is None
        # The next interval saw nothing new.
        assert console.sample()["series"]["echo:1"]["requests_per_s"] == 0

        body = c.get("/console/api/metrics").json()
        assert len(body["points"]) == 2 and body["series"]["echo:1"] == {
            "model": "echo", "version": "1", "route": "", "variant": ""}
        later = c.get("/console/api/metrics", params={"since": body["points"][0]["t"]}).json()
        assert [p["t"] for p in later["points"]] == [body["points"][1]["t"]]

        errors = c.get("/console/api/errors").json()["errors"]
        answers = [e for e in errors if e["kind"] == "answers"]
        assert {(e["series"], e["outcome"], e["count"]) for e in answers} == {
            ("poison:1", "client_error", 2), ("crash:1", "error", 1)}
        logged = [e for e in errors if e["kind"] == "log" and e["level"] == "error"]
        assert any(e["fields"].get("status") == 500 and "crash" in str(e["fields"].get("path")) for e in logged)
        assert len(c.get("/console/api/errors", params={"limit": 1}).json()["errors"]) == 1


BAD = [
    ("/console/api/metrics?since=soon", 400),
    ("/console/api/metrics?since=nan", 400),
    ("/console/api/metrics?since=1&since=2", 400),
    ("/console/api/metrics?window=5", 400),
    ("/console/api/errors?limit=0", 400),
    ("/console/api/errors?limit=2.5", 400),
    ("/console/api/errors?limit=100000", 400),
    ("/console/api/overview?x", 400),
    ("/console/api/nothing", 404),
    ("/console/api/models/nope/example", 404),
    ("/console/api/models/echo/example?version=9", 404),
    ("/console/api/routes/nope/report", 404),
    ("/console/elsewhere", 404),
]


def test_bad_params_get_4xx_json(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        for path, status in BAD:
            r = c.get(path)
            assert r.status_code == status, (path, r.text)
            assert r.headers["content-type"] == "application/json" and r.json()["error"], path


def test_wrong_methods_get_405(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        r = c.post("/console/api/overview", json={})
        assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]
        r = c.get("/console/api/models/echo/infer")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert c.delete("/console").status_code == 405


def test_example_and_try_it_go_through_the_inference_path(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        ex = c.get("/console/api/models/echo/example").json()
        assert ex["kind"] == "tensor" and ex["source"] == "signature" and ex["resolved"] == "echo:2"
        assert ex["request"] == {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]}
        url = "/console/api/models/echo/versions/1/infer"
        assert c.post(url, json=echo_request(ROWS)).status_code == 403  # no console header: not from the page
        r = c.post(url, json=echo_request(ROWS), headers={"x-modelpod-console": "1"})
        assert r.status_code == 200 and r.headers["modelpod-variant"] == "echo:1"
        assert r.json()["outputs"][0]["data"] == [1.0, 2.0]
        bad = c.post(url, content=b"{not json", headers={"x-modelpod-console": "1"})
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        foreign = c.post(url, json=echo_request(ROWS), headers={"x-modelpod-console": "1",
                                                                 "origin": "http://evil.example"})
        assert foreign.status_code == 403
    # The 200 counts; the body that is not JSON names no model and counts nowhere.
    assert console.sample()["series"]["echo:1"]["requests_per_s"] == pytest.approx(1.0)


def test_without_a_token_only_loopback_hosts_and_peers(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as c:
        r = c.get("/console/api/overview", headers={"host": "rebound.example.com"})
        assert r.status_code == 403 and "loopback" in r.json()["error"]
        assert c.get("/console", headers={"host": "localhost"}).status_code == 200
    app = console.app
    for peer, status in (("10.1.2.3", 403), ("::ffff:192.168.1.9", 403), ("::ffff:127.0.0.1", 200), ("::1", 200)):
        req = Request("GET", "/console/api/overview", "", {"host": "127.0.0.1"}, b"", True, 0.0, peer=peer)
        resp = asyncio.run_coroutine_threadsafe(app(req), console.live.loop).result(30)  # type: ignore[arg-type]
        assert resp.status == status, peer


def test_without_a_token_no_page_may_manage_the_server(console: Console) -> None:
    own = {"origin": console.url, "content-type": "application/json"}
    with httpx.Client(base_url=console.url, timeout=30) as c:
        for path in ("/v2/repository/index", "/v2/repository/models/echo/unload", "/v2/routes/echo",
                     "/v2/models/echo/feedback"):
            r = c.post(path, json={}, headers=own)
            assert r.status_code == 403 and "token" in r.json()["error"], path
        assert c.post("/v2/repository/index", json={}).status_code == 200  # a plain loopback client still may
        assert c.get("/v2/routes", headers=own).status_code == 200  # reads stay open
    assert console.live.engine.registry.versions("echo")[1].state.value == "READY"


def test_with_a_token_everything_but_the_static_files_needs_it(guarded: Console) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        page = c.get("/console")
        assert page.status_code == 401 and 'action="/console/login"' in page.text  # the login form
        assert c.get("/console/static/console.js").status_code == 200
        for path in ("/console/api/overview", "/console/api/metrics", "/console/api/errors",
                     "/console/api/models/echo/example"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert c.get("/console/api/overview", headers=auth).json()["console"]["auth"] == "token"
        assert c.get("/console", headers={"authorization": "Bearer wrong"}).status_code == 401
        # Try it needs the token too, and with it reaches the (token-protected) inference path.
        url = "/console/api/models/echo/infer"
        assert c.post(url, json=echo_request(ROWS), headers={"x-modelpod-console": "1"}).status_code == 401
        ok = c.post(url, json=echo_request(ROWS), headers={"x-modelpod-console": "1", **auth})
        assert ok.status_code == 200


def test_login_sets_a_session_cookie_not_the_token(guarded: Console) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        wrong = c.post("/console/login", content=b"token=nope", headers=form)
        assert wrong.status_code == 303 and wrong.headers["location"] == "/console?failed=1"
        assert "set-cookie" not in wrong.headers
        assert c.post("/console/login", json={"token": TOKEN}).status_code == 400
        assert c.post("/console/login", content=f"token={TOKEN}".encode(),
                      headers={**form, "origin": "http://evil.example"}).status_code == 403
        ok = c.post("/console/login", content=f"token={TOKEN}".encode(), headers=form)
        assert ok.status_code == 303 and ok.headers["location"] == "/console"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        assert c.get("/console").status_code == 200  # the client kept the cookie
        assert c.get("/console/api/overview").status_code == 200
        r = c.post("/console/api/models/echo/infer", json=echo_request(ROWS), headers={"x-modelpod-console": "1"})
        assert r.status_code == 200
        # The session opens the console only: the API still wants the bearer token.
        assert c.post("/v2/models/echo/infer", json=echo_request(ROWS)).status_code == 401
        out = c.post("/console/logout")
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
        assert c.get("/console/api/overview").status_code == 401


def test_no_unauthenticated_request_changes_state(guarded: Console) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        for method, path in (("POST", "/v2/repository/models/echo/unload"), ("POST", "/console/api/models/echo/infer"),
                             ("DELETE", "/v2/routes/echo"), ("PUT", "/console/api/overview"),
                             ("POST", "/console/api/models/echo/versions/1/unload")):
            r = c.request(method, path, json={}, headers={"x-modelpod-console": "1"})
            assert r.status_code in (401, 404, 405), (method, path, r.status_code)
        states = {m["label"]: m["state"] for m in c.get(
            "/console/api/overview", headers={"authorization": f"Bearer {TOKEN}"}).json()["models"]}
    assert states == {"echo:1": "READY", "echo:2": "READY", "poison:1": "READY", "crash:1": "READY"}


def test_routes_and_their_report() -> None:
    routes = {"echo-ab": {"variants": [{"model": "echo:1", "weight": 75}, {"model": "echo:2", "weight": 25}]}}
    c = _console(routes=routes)
    with c.live, httpx.Client(base_url=c.url, timeout=30) as client:
        for _ in range(20):
            assert client.post("/v2/models/echo-ab/infer", json=echo_request(ROWS)).status_code == 200
        route = client.get("/console/api/overview").json()["routes"][0]
        assert route["name"] == "echo-ab" and route["share"] == {"echo:1": 0.75, "echo:2": 0.25}
        report = client.get("/console/api/routes/echo-ab/report").json()
        assert sum(v["requests"] for v in report["variants"]) == 20
        point = c.sample()
        routed = {sid: s for sid, s in point["series"].items() if sid.startswith("echo-ab/")}
        assert set(routed) <= {"echo-ab/echo:1", "echo-ab/echo:2"}
        assert sum(s["requests_per_s"] for s in routed.values()) == pytest.approx(20.0)
        ex = client.get("/console/api/models/echo-ab/example").json()
        assert ex["kind"] == "tensor" and ex["resolved"] in ("echo:1", "echo:2")


def test_sections_appear_only_when_provided(console: Console) -> None:
    engine = console.live.engine
    with httpx.Client(base_url=console.url, timeout=30) as c:
        assert c.get("/console/api/sections").json() == {}
        table = {"title": "Drift", "columns": ["model", "feature", "psi"], "rows": [["echo:1", "x0", 0.02]]}
        engine.console_sections["drift"] = lambda: table

        def broken() -> dict[str, Any]:
            raise RuntimeError("replica pool gone")
        engine.console_sections["replicas"] = broken
        assert c.get("/console/api/overview").json()["sections"] == ["drift", "replicas"]
        body = c.get("/console/api/sections").json()
        assert body["drift"] == table
        assert "replica pool gone" in body["replicas"]["error"]


def test_pod_sample_fills_the_try_it_form(tmp_path: Any, served_home: Any) -> None:
    home, rec = served_home
    settings = Settings(home=home, console=True)

    def setup(engine: InferenceEngine) -> None:
        engine.add("lr")

    def wrap(rest: RestApp, engine: InferenceEngine) -> ConsoleApp:
        return ConsoleApp(rest, engine, settings)

    with LiveServer(settings, setup, wrap=wrap) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        ex = c.get("/console/api/models/lr/example").json()
        assert ex["source"] == "sample" and ex["kind"] == "tensor"
        (tensor,) = ex["request"]["inputs"]
        assert tensor["shape"] == [1, 20] and len(tensor["data"]) == 20
        r = c.post("/console/api/models/lr/infer", json=ex["request"], headers={"x-modelpod-console": "1"})
        assert r.status_code == 200 and r.headers["modelpod-variant"] == f"lr:{rec.version}"
        labels = {m["label"] for m in c.get("/console/api/overview").json()["models"]}
        assert f"lr:{rec.version}" in labels
