"""Progressive rollouts (completion, alias move, automatic rollback on errors and on latency,
rollback to the last completed state) and the bandit policy."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from servutil import LiveServer, wait_for
from traffic_util import Failing, Offset, Slow, body, route_server

ROUTE = {"churn": {"variants": [{"model": "churn:2", "weight": 100}]}}


@contextmanager
def traffic(live: LiveServer, path: str = "/v2/models/churn/infer") -> Iterator[Counter[str]]:
    """Requests in a loop on a thread while the block runs; counts statuses and variants."""
    seen: Counter[str] = Counter()
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post(path, json=body())
                seen[str(r.status_code)] += 1
                seen[r.headers.get("modelpod-variant", "?")] += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join(60)


def _rollout(c: httpx.Client, **plan: Any) -> dict[str, Any]:
    r = c.post("/v2/routes/churn/rollout", json=plan)
    assert r.status_code == 200, r.text
    return r.json()


def _finished(c: httpx.Client) -> Any:
    shown = c.get("/v2/routes/churn").json()
    return shown if shown["rollout"]["state"] != "running" else None


def test_rollout_completes_moves_the_alias_and_rolls_back_to_the_last_completed_state() -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, ROUTE) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        versions = live.engine.registry.versions("churn")
        versions[2].aliases = frozenset({"production"})
        with traffic(live) as seen:
            started = _rollout(c, to="churn:3", steps=[20, 60, 100], every="0.2s", min_requests=15,
                               max_error_rate=0.05, alias="production")
            assert started["rollout"]["state"] == "running"
            done = wait_for(lambda: _finished(c), 120, "the rollout to finish")
        assert done["rollout"]["state"] == "completed", done
        assert [s["percent"] for s in done["rollout"]["steps_done"]] == [20, 60, 100]
        assert all(s["requests"] >= 15 for s in done["rollout"]["steps_done"])
        assert done["variants"] == [{"model": "churn:3", "weight": 100}]
        assert seen["200"] > 0 and set(seen) <= {"200", "churn:2", "churn:3"}
        assert "production" in versions[3].aliases and "production" not in versions[2].aliases
        assert c.post("/v2/models/churn/versions/production/infer", json=body()).headers["modelpod-variant"] == \
            "churn:3"
        # The old version is unloaded; a rollback loads it again before giving it traffic.
        assert c.post("/v2/repository/models/churn/versions/2/unload").status_code == 200
        assert not versions[2].ready
        # Rollback: the completed state before the rollout, alias included.
        back = c.post("/v2/routes/churn/rollback")
        assert back.status_code == 200, back.text
        assert back.json()["variants"] == [{"model": "churn:2", "weight": 100}]
        assert "production" in versions[2].aliases and "production" not in versions[3].aliases
        assert versions[2].ready
        assert c.post("/v2/models/churn/infer", json=body()).headers["modelpod-variant"] == "churn:2"
        r = c.post("/v2/routes/churn/rollback")
        assert r.status_code == 409 and "no earlier completed state" in r.json()["error"]


@pytest.mark.parametrize(("candidate", "limits", "why"), [
    (Failing(0), {"max_error_rate": 0.01}, "error rate"),
    (Slow(0, delay=0.05), {"max_p95_ms": 20}, "p95 latency"),
])
def test_a_failing_candidate_is_rolled_back_within_one_step(candidate: Any, limits: dict[str, Any], why: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="modelpod.serving")
    with route_server({"churn:2": Offset(0), "churn:3": candidate}, ROUTE) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        with traffic(live):
            _rollout(c, to="churn:3", steps="50,100", every="30s", min_requests=10, **limits)
            done = wait_for(lambda: _finished(c), 60, "the rollback")
        rollout = done["rollout"]
        assert rollout["state"] == "rolled_back" and why in rollout["reason"] and rollout["step"] == 50
        assert done["share"].get("churn:3", 0) == 0 and done["share"]["churn:2"] == 1
        assert any(why in e.get("reason", "") for e in done["events"])
        assert any(r.getMessage() == "rollout rolled back" and why in str(getattr(r, "fields", {}))
                   for r in caplog.records)
        # From now on every request goes to the baseline.
        for _ in range(20):
            assert c.post("/v2/models/churn/infer", json=body()).headers["modelpod-variant"] == "churn:2"


def test_rollback_during_a_rollout_and_conflicts() -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, ROUTE) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        _rollout(c, to="churn:3", steps="50,100", every="1h", min_requests=1)
        wait_for(lambda: c.get("/v2/routes/churn").json()["share"].get("churn:3") == 0.5, 30, "the first step")
        assert c.post("/v2/routes/churn/rollout", json={"to": "churn:3", "every": "1s"}).status_code == 409
        r = c.put("/v2/routes/churn", json={"variants": [{"model": "churn:3", "weight": 1}]})
        assert r.status_code == 409 and "rollout is running" in r.json()["error"]
        back = c.post("/v2/routes/churn/rollback").json()
        assert back["rollout"]["state"] == "cancelled"
        assert back["variants"] == [{"model": "churn:2", "weight": 100}]
        for bad, message in (({"to": "churn:3", "steps": [50, 20, 100]}, "rise"),
                             ({"to": "churn:3", "steps": [10, 50]}, "last step must be 100"),
                             ({"to": "churn:3", "every": "soon"}, "duration"),
                             ({"to": "churn:9"}, "unknown model"),
                             ({"to": "churn:2"}, "baseline already"),
                             ({"to": "churn:3", "max_error_rate": 2}, "max_error_rate"),
                             ({"steps": [100]}, "'to'")):
            r = c.post("/v2/routes/churn/rollout", json=bad)
            assert 400 <= r.status_code < 500 and message in r.json()["error"], (bad, r.text)
        assert c.get("/v2/routes/churn").json()["variants"] == [{"model": "churn:2", "weight": 100}]


def test_bandit_moves_traffic_to_the_better_variant_and_keeps_the_floor() -> None:
    routes = {"churn": {"variants": [{"model": "churn:2", "weight": 50}, {"model": "churn:3", "weight": 50}],
                        "policy": "bandit", "floor": 0.1}}
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, routes) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        for _ in range(200):
            r = c.post("/v2/models/churn/infer", json=body())
            reward = 1.0 if r.headers["modelpod-variant"] == "churn:3" else 0.0
            assert c.post("/v2/models/churn/feedback", json={"id": r.json()["id"], "reward": reward}).status_code == 200
        shown = c.get("/v2/routes/churn").json()
        assert shown["share"]["churn:3"] == pytest.approx(0.9, abs=0.01)
        assert shown["share"]["churn:2"] == pytest.approx(0.1, abs=0.01)  # the floor: never starved
        later = Counter(c.post("/v2/models/churn/infer", json=body()).headers["modelpod-variant"] for _ in range(300))
        assert later["churn:2"] > 0 and later["churn:3"] > later["churn:2"] * 3
        r = c.post("/v2/routes/churn/rollout", json={"to": "churn:3"})
        assert r.status_code == 409 and "bandit" in r.json()["error"]


def test_a_candidate_with_worse_rewards_is_rolled_back() -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, ROUTE) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        stop = threading.Event()

        def rewarded() -> None:  # every answer gets feedback: the candidate's are all bad
            with httpx.Client(base_url=live.url, timeout=30) as cc:
                while not stop.is_set():
                    r = cc.post("/v2/models/churn/infer", json=body())
                    good = r.headers["modelpod-variant"] == "churn:2"
                    cc.post("/v2/models/churn/feedback", json={"id": r.json()["id"], "reward": 1.0 if good else 0.0})

        t = threading.Thread(target=rewarded, daemon=True)
        t.start()
        try:
            _rollout(c, to="churn:3", steps="50,100", every="1h", min_requests=5, min_reward_delta=-0.01)
            done = wait_for(lambda: _finished(c), 60, "the rollback")
        finally:
            stop.set()
            t.join(30)
        assert done["rollout"]["state"] == "rolled_back" and "reward delta" in done["rollout"]["reason"]
        report = {v["variant"]: v for v in c.get("/v2/routes/churn/report").json()["variants"]}
        assert report["churn:3"]["reward"]["mean"] == 0.0 and report["churn:2"]["reward"]["mean"] == 1.0
