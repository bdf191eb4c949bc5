"""The routes extension: live management, authentication, and bad input refused with nothing changed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from traffic_util import Offset, body, route_server, variants_of

from modelpod.errors import UsageError
from modelpod.model import Model
from modelpod.serving.config import ServeConfig
from modelpod.settings import Settings

SPLIT = {"churn": {"variants": [{"model": "churn:2", "weight": 90}, {"model": "churn:3", "weight": 10}]}}


class BrokenLoad(Offset):
    def load(self) -> None:
        raise RuntimeError("weights are corrupt")


def _models() -> dict[str, Model]:
    return {"churn:2": Offset(0), "churn:3": Offset(100), "churn:4": Offset(200), "echo:1": Offset(5)}


def test_list_show_put_report_delete() -> None:
    with route_server(_models(), SPLIT) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        listed = c.get("/v2/routes").json()
        assert [r["name"] for r in listed] == ["churn"]
        shown = c.get("/v2/routes/churn").json()
        assert shown["variants"] == SPLIT["churn"]["variants"] and shown["status"] == "serving"
        assert shown["baseline"] == "churn:2" and shown["share"] == {"churn:2": 0.9, "churn:3": 0.1}
        # What GET gives can be PUT back as it is.
        assert c.put("/v2/routes/churn", json=shown).json()["weights"] == shown["weights"]
        # The same schema goes back in; a change takes effect for the next request.
        new = {"variants": [{"model": "churn:3", "weight": 1}], "shadow": ["churn:4"]}
        r = c.put("/v2/routes/churn", json=new)
        assert r.status_code == 200, r.text
        assert r.json()["variants"] == new["variants"] and r.json()["shadow"] == ["churn:4"]
        assert set(variants_of(c, "/v2/models/churn/infer", 30)) == {"churn:3"}
        # A new route under a new name.
        r = c.put("/v2/routes/scorer", json={"variants": [{"model": "echo:1", "weight": 3},
                                                           {"model": "churn:2", "weight": 1}]})
        assert r.status_code == 200, r.text
        assert len(set(variants_of(c, "/v2/models/scorer/infer", 60))) == 2
        report = c.get("/v2/routes/scorer/report").json()
        assert report["baseline"] == "echo:1"
        assert sum(v["requests"] for v in report["variants"]) == 60
        assert c.delete("/v2/routes/scorer").status_code == 200
        assert c.get("/v2/routes/scorer").status_code == 404
        assert c.post("/v2/models/scorer/infer", json=body()).status_code == 404
        # HEAD and wrong methods.
        assert c.head("/v2/routes/churn").status_code == 200
        r = c.post("/v2/routes/churn")
        assert r.status_code == 405 and "PUT" in r.headers["allow"] and "error" in r.json()


BAD: list[tuple[Any, str]] = [
    ({"variants": [{"model": "churn:2", "weight": -1}]}, "negative"),
    ({"variants": [{"model": "churn:2", "weight": 0}, {"model": "churn:3", "weight": 0}]}, "all zero"),
    ({"variants": [{"model": "churn:7", "weight": 1}]}, "unknown model churn:7"),
    ({"variants": [{"model": "churn:2", "weight": 1}], "shadow": ["churn:2"]}, "both a variant and a shadow"),
    ({"variants": [{"model": "churn:2", "weight": "ten"}]}, "must be a number"),
    ({"variants": [{"model": "churn:2"}]}, "'weight' is missing"),
    ({"variants": []}, "non-empty"),
    ({"variants": [{"model": "churn:2", "weight": 1}], "colour": "red"}, "unknown key"),
    ({"variants": [{"model": "churn:2", "weight": 1}], "policy": "greedy"}, "policy"),
    ({"variants": [{"model": "churn:2", "weight": 1}, {"model": "churn:2", "weight": 2}]}, "twice"),
    ({"variants": [{"model": "../etc", "weight": 1}]}, "not a model reference"),
    ({"variants": [{"model": "churn:2", "weight": 1}], "sticky": {"cookie": "x"}}, "sticky"),
    ([1, 2, 3], "mapping"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_bad_specs_are_refused_and_nothing_changes(spec: Any, message: str) -> None:
    with route_server(_models(), SPLIT) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        before = c.get("/v2/routes/churn").json()
        r = c.put("/v2/routes/churn", json=spec)
        assert 400 <= r.status_code < 500, r.text
        assert message in r.json()["error"]
        assert c.get("/v2/routes/churn").json() == before


def test_names_that_clash_are_refused() -> None:
    with route_server(_models(), SPLIT) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        # A route named like a served model whose versions it does not split.
        r = c.put("/v2/routes/echo", json={"variants": [{"model": "churn:2", "weight": 1}]})
        assert r.status_code == 400 and "named like the served model echo" in r.json()["error"]
        # A route that names a route.
        assert c.put("/v2/routes/ab", json={"variants": [{"model": "echo:1", "weight": 1}]}).status_code == 200
        r = c.put("/v2/routes/outer", json={"variants": [{"model": "ab", "weight": 1}]})
        assert r.status_code == 400 and "names the route ab" in r.json()["error"]
        assert c.get("/v2/routes/outer").status_code == 404
        r = c.put("/v2/routes/bad%20name", json={"variants": [{"model": "echo:1", "weight": 1}]})
        assert r.status_code == 400
        assert c.put("/v2/routes/churn", content=b"{not json").status_code == 400


def test_bad_config_routes_refused_at_start() -> None:
    from modelpod.serving.engine import InferenceEngine

    for routes, message in ((SPLIT | {"x": {"variants": [{"model": "churn:2", "weight": -3}]}}, "negative"),
                            ({"echo": {"variants": [{"model": "churn:2", "weight": 1}]}}, "named like"),
                            ({"r": {"variants": [{"model": "nope:1", "weight": 1}]}}, "unknown model")):
        engine = InferenceEngine(Settings())
        with pytest.raises(UsageError, match=message) as info:
            engine.config = ServeConfig.from_settings(Settings(), {"routes": routes})
            for ref, model in _models().items():
                engine.add_model(model, name=ref.split(":")[0], version=int(ref.split(":")[1]))
            engine.configure_routes()
        assert info.value.exit_code == 2
        assert engine.traffic.routes == {}  # all routes are checked before any is set


def test_a_variant_whose_load_fails_leaves_the_route_on_the_others() -> None:
    models = {**_models(), "churn:5": BrokenLoad(0)}
    # Lazy: churn:5 is first loaded by the PUT (as a model fetched from the store would be).
    with route_server(models, SPLIT, settings=Settings(lazy_load=True)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.put("/v2/routes/churn", json={"variants": [{"model": "churn:2", "weight": 50},
                                                          {"model": "churn:5", "weight": 50}]})
        assert r.status_code == 200, r.text
        shown = r.json()
        assert "degraded" in shown["status"] and "weights are corrupt" in shown["status"]
        assert set(variants_of(c, "/v2/models/churn/infer", 40)) == {"churn:2"}
        assert c.get("/v2/health/ready").status_code == 200  # one failed canary does not unready the server
        r = c.post("/v2/routes/churn/rollout", json={"to": "churn:5"})
        assert r.status_code == 503 and "did not load" in r.json()["error"]
        assert c.get("/v2/health/ready").status_code == 200
        # With no variant able to serve, the change is refused and the route stays.
        r = c.put("/v2/routes/churn", json={"variants": [{"model": "churn:5", "weight": 1}]})
        assert r.status_code == 503 and "unchanged" in r.json()["error"]
        assert c.get("/v2/routes/churn").json()["weights"] == {"churn:2": 50, "churn:5": 50}


def test_management_needs_the_token() -> None:
    settings = Settings(token="s3cret")
    with route_server(_models(), SPLIT, settings=settings) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        auth = {"authorization": "Bearer s3cret"}
        for method, path in (("GET", "/v2/routes"), ("GET", "/v2/routes/churn"), ("PUT", "/v2/routes/churn"),
                             ("DELETE", "/v2/routes/churn"), ("GET", "/v2/routes/churn/report"),
                             ("POST", "/v2/routes/churn/rollback"), ("POST", "/v2/models/churn/feedback")):
            r = c.request(method, path, json={})
            assert r.status_code == 401 and "token" in r.json()["error"], (method, path)
        assert c.get("/v2/routes", headers=auth).status_code == 200
        r = c.post("/v2/models/churn/infer", json=body(), headers=auth)
        fb = c.post("/v2/models/churn/feedback", json={"id": r.json()["id"], "reward": 1}, headers=auth)
        assert fb.status_code == 200


def test_management_beyond_loopback_needs_a_token() -> None:
    from modelpod.protocols.http import Request
    from modelpod.protocols.rest import RestApp
    from modelpod.serving.engine import InferenceEngine

    engine = InferenceEngine(Settings())
    app = RestApp(engine, Settings(host="0.0.0.0"))
    response = asyncio.run(app(Request("GET", "/v2/routes", "", {}, b"", True, 0.0)))
    assert response.status == 401


def test_one_version_unloads_but_not_the_last_one_a_route_serves_on() -> None:
    with route_server(_models(), SPLIT) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.post("/v2/repository/models/churn/versions/3/unload").status_code == 200
        states = {r["version"]: r["state"] for r in c.post("/v2/repository/index").json() if r["name"] == "churn"}
        assert states["3"] == "UNAVAILABLE" and states["2"] == "READY"
        assert set(variants_of(c, "/v2/models/churn/infer", 30)) == {"churn:2"}
        r = c.post("/v2/repository/models/churn/versions/2/unload")
        assert r.status_code == 409 and "no variant left" in r.json()["error"]
        r = c.post("/v2/repository/models/churn/unload")
        assert r.status_code == 409
        assert c.post("/v2/repository/models/churn/versions/3/load").status_code == 200
        assert len(set(variants_of(c, "/v2/models/churn/infer", 200))) == 2


def test_a_route_variant_failing_to_load_at_start_leaves_the_server_ready(served_home: Any) -> None:
    from servutil import LiveServer

    from modelpod.serving.engine import InferenceEngine
    from modelpod.serving.registry import ModelSource

    home, _ = served_home
    settings = Settings(home=home)

    def setup(routes: dict[str, Any]) -> Any:
        def go(engine: InferenceEngine) -> None:
            engine.config = ServeConfig.from_settings(settings, {"routes": routes})
            engine.add_model(Offset(0), name="good", version=1)
            engine.configure_routes()  # lr:1 comes from the store because the route names it
            entry = engine.registry.versions("lr")[1]
            entry.source = ModelSource(model=BrokenLoad(0))  # and its load will fail
        return go

    both = {"scorer": {"variants": [{"model": "lr:1", "weight": 50}, {"model": "good:1", "weight": 50}]}}
    with LiveServer(settings, setup(both)) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/v2/health/ready").status_code == 200
        shown = c.get("/v2/routes/scorer").json()
        assert "degraded" in shown["status"] and "weights are corrupt" in shown["status"]
        assert set(variants_of(c, "/v2/models/scorer/infer", 30)) == {"good:1"}
    alone = {"scorer": {"variants": [{"model": "lr:1", "weight": 1}, {"model": "good:1", "weight": 0}]}}
    with LiveServer(settings, setup(alone)) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/v2/health/ready").status_code == 503  # the route cannot serve at all
        assert "down" in c.get("/v2/routes/scorer").json()["status"]


def test_routes_api_has_the_repository_guard() -> None:
    with route_server(_models(), SPLIT) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        spec = {"variants": [{"model": "churn:3", "weight": 1}]}
        r = c.put("/v2/routes/churn", json=spec, headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and "error" in r.json()
        r = c.put("/v2/routes/churn", content=b"variants=1", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/v2/routes/churn/rollback", headers={"host": "evil.example"})
        assert r.status_code == 403
        assert c.get("/v2/routes/churn").json()["variants"] == SPLIT["churn"]["variants"]
