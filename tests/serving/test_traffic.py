"""Routes on the in-process server: weighted split, bypass, variant header, sticky keys, shadows,
metrics labels, feedback joins, gRPC trailing metadata."""

from __future__ import annotations

import math
from collections import Counter

import httpx
import numpy as np
import pytest
from servutil import GatedModel, metric_value
from test_metrics import promtool_check
from traffic_util import Failing, Labeller, Offset, Reverse, body, route_server, variants_of

from modelpod.serving import feedback as feedback_module

SPLIT = {"churn": {"variants": [{"model": "churn:2", "weight": 90}, {"model": "churn:3", "weight": 10}]}}


def _binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_weighted_split_within_binomial_bounds() -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, SPLIT) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        n = 2000
        seen = Counter()
        for _ in range(n):
            r = c.post("/v2/models/churn/infer", json=body(1.0))
            assert r.status_code == 200, r.text
            out = r.json()
            variant = r.headers["modelpod-variant"]
            seen[variant] += 1
            # The header, model_version and the numbers all name the same version.
            assert variant == f"churn:{out['model_version']}"
            assert out["outputs"][0]["data"][0] == (101.0 if out["model_version"] == "3" else 1.0)
        assert set(seen) == {"churn:2", "churn:3"}
        assert _binomial_ok(seen["churn:3"], n, 0.10), seen


def test_version_path_and_model_name_bypass_the_split() -> None:
    routes = {**SPLIT, "scorer": {"variants": [{"model": "churn:2", "weight": 50}, {"model": "other:1", "weight": 50}]}}
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100), "other:1": Offset(7)}, routes) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        assert set(variants_of(c, "/v2/models/churn/versions/3/infer", 40)) == {"churn:3"}
        assert set(variants_of(c, "/v2/models/churn/versions/2/infer", 40)) == {"churn:2"}
        # A route named otherwise: the models' own names bypass it.
        assert set(variants_of(c, "/v2/models/other/infer", 30)) == {"other:1"}
        assert set(variants_of(c, "/v2/models/scorer/infer", 200)) == {"churn:2", "other:1"}
        # A route that is no model takes a variant's version too, and has metadata.
        assert set(variants_of(c, "/v2/models/scorer/versions/1/infer", 10)) == {"other:1"}
        assert c.get("/v2/models/scorer").status_code == 200
        assert c.get("/v2/models/scorer/ready").status_code == 200
        # KServe v1 / TF-Serving predict goes through the same split.
        v1 = {c.post("/v1/models/scorer:predict", json={"instances": [[1.0, 2.0]]}).headers["modelpod-variant"]
              for _ in range(60)}
        assert v1 == {"churn:2", "other:1"}
        # Unrouted answers carry the header too.
        r = c.post("/v2/models/other/versions/1/infer", json=body())
        assert r.headers["modelpod-variant"] == "other:1" and r.json()["model_version"] == "1"


def test_sticky_keys_hash_consistently_and_move_only_as_needed() -> None:
    sticky = {"churn": {**SPLIT["churn"], "sticky": {"header": "X-User-Id"}}}
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100), "churn:4": Offset(200)}, sticky) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        first = variants_of(c, "/v2/models/churn/infer", 60, headers=lambda i: {"x-user-id": f"u{i % 20}"})
        for i, v in enumerate(first):
            assert v == first[i % 20], "a sticky key changed variant without a weight change"
        route = live.engine.traffic.routes["churn"]
        keys = [f"user-{i}" for i in range(3000)]

        def assignment() -> list[str]:
            return [route.pick({"x-user-id": k}).name for k in keys]

        before = assignment()
        assert _binomial_ok(before.count("churn:3"), len(keys), 0.10)
        r = c.put("/v2/routes/churn", json={"variants": [{"model": "churn:2", "weight": 75},
                                                          {"model": "churn:3", "weight": 25}],
                                            "sticky": {"header": "x-user-id"}})
        assert r.status_code == 200, r.text
        after = assignment()
        moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        # Only churn:2 -> churn:3 moves, about 15 % of the keys (what the weight change asks for).
        assert moved and all(m == ("churn:2", "churn:3") for m in moved)
        assert _binomial_ok(len(moved), len(keys), 0.15)
        # A new variant takes keys only to itself.
        r = c.put("/v2/routes/churn", json={"variants": [{"model": "churn:2", "weight": 75},
                                                          {"model": "churn:3", "weight": 25},
                                                          {"model": "churn:4", "weight": 20}],
                                            "sticky": {"header": "x-user-id"}})
        assert r.status_code == 200, r.text
        third = assignment()
        assert all(b == "churn:4" for a, b in zip(after, third, strict=True) if a != b)
        assert _binomial_ok(third.count("churn:4"), len(keys), 20 / 120)
        # Without a key the split is random: both variants answer.
        assert len(set(variants_of(c, "/v2/models/churn/infer", 100))) > 1


def test_shadow_errors_never_reach_the_caller_and_agreement_is_measured() -> None:
    routes = {"churn": {"variants": [{"model": "churn:2", "weight": 100}],
                        "shadow": ["churn:3", "churn:4", "churn:5"]}}
    # churn:4 adds 1e-7 (within the tolerance), churn:5 swaps the columns (another argmax).
    models = {"churn:2": Offset(0), "churn:3": Failing(0), "churn:4": Offset(1e-7), "churn:5": Reverse(0)}
    two = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    with route_server(models, routes) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert set(variants_of(c, "/v2/models/churn/infer", 50, make=lambda i: two)) == {"churn:2"}
        live.call(live.engine.traffic.shadows.wait)
        text = c.get("/metrics").text
        labels = {"route": "churn"}
        assert metric_value(text, "modelpod_shadow_agreement", variant="churn:4", **labels) == 1.0
        assert metric_value(text, "modelpod_shadow_agreement", variant="churn:5", **labels) == 0.0
        assert metric_value(text, "modelpod_shadow_requests_total", variant="churn:3", outcome="error") == 50
        assert metric_value(text, "modelpod_shadow_requests_total", variant="churn:4", outcome="compared") == 50
        assert metric_value(text, "modelpod_requests_total", variant="churn:3", protocol="shadow",
                            outcome="error") == 50
        promtool_check(text.encode())  # the route families too
        report = c.get("/v2/routes/churn/report").json()
        rows = {v["variant"]: v for v in report["variants"]}
        assert rows["churn:4"]["shadow"]["agreement"] == 1.0 and rows["churn:3"]["shadow"]["errors"] == 50
        assert rows["churn:2"]["requests"] == 50 and rows["churn:2"]["errors"] == 0


def test_slow_shadow_is_dropped_first_and_never_delays_the_answer() -> None:
    gated = GatedModel()
    routes = {"churn": {"variants": [{"model": "churn:2", "weight": 100}], "shadow": ["churn:9"]}}
    with route_server({"churn:2": Offset(0), "churn:9": gated}, routes) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        try:
            # The shadow never answers while the gate is shut; the primary answers every request.
            n = 150
            body_x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
            for _ in range(n):
                r = c.post("/v2/models/churn/infer", json=body_x)
                assert r.status_code == 200
            stats = live.engine.traffic.routes["churn"].shadows[0].stats
            assert stats.shadow_dropped > 0  # the bounded queue dropped copies instead of growing
            assert live.engine.traffic.shadows.pending() <= feedback_shadow_queue()
        finally:
            gated.gate.set()
        live.call(live.engine.traffic.shadows.wait)
        assert stats.shadow_compared + stats.shadow_dropped + stats.shadow_errors == n


def feedback_shadow_queue() -> int:
    from modelpod.serving.shadow import SHADOW_QUEUE

    return SHADOW_QUEUE


def test_routed_metrics_carry_route_and_variant_and_pass_promtool() -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, SPLIT) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        variants = variants_of(c, "/v2/models/churn/infer", 100)
        variants_of(c, "/v2/models/churn/versions/2/infer", 5)
        text = c.get("/metrics").text
        for v in set(variants):
            version = v.split(":")[1]
            assert metric_value(text, "modelpod_requests_total", model="churn", version=version, route="churn",
                                variant=v, outcome="success") == variants.count(v)
            assert metric_value(text, "modelpod_request_duration_seconds_count", model="churn", version=version,
                                route="churn", variant=v) == variants.count(v)
        # The bypassing requests are counted without route labels.
        direct = [ln for ln in text.splitlines() if ln.startswith("modelpod_requests_total{")
                  and 'version="2"' in ln and "route=" not in ln]
        assert direct and direct[0].endswith(" 5")
        assert metric_value(text, "modelpod_route_share", route="churn", variant="churn:3") == pytest.approx(0.1)
        promtool_check(text.encode())


def test_feedback_joins_the_answering_variant_and_refuses_unknown_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, SPLIT) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/v2/models/churn/infer", json=body())
        rid, variant = r.json()["id"], r.headers["modelpod-variant"]
        assert rid  # generated: the request had none
        r2 = c.post("/v2/models/churn/infer", json=body(id="my-id-1"))
        assert r2.json()["id"] == "my-id-1"
        r3 = c.post("/v2/models/churn/infer", json=body(), headers={"x-request-id": "trace-7"})
        assert r3.json()["id"] == "trace-7" and r3.headers["x-request-id"] == "trace-7"
        fb = c.post("/v2/models/churn/feedback", json={"id": rid, "reward": 0.75})
        assert fb.status_code == 200 and fb.json() == {"id": rid, "route": "churn", "variant": variant, "reward": 0.75}
        again = c.post("/v2/models/churn/feedback", json={"id": rid, "reward": 1})
        assert again.status_code == 409 and "already" in again.json()["error"]
        unknown = c.post("/v2/models/churn/feedback", json={"id": "never-seen", "reward": 1})
        assert unknown.status_code == 404 and "unknown request id" in unknown.json()["error"]
        for bad in ({"id": rid}, {"reward": 1}, {"id": rid, "reward": "good"}, {"id": rid, "reward": 1, "label": 1},
                    [1, 2], {"id": rid, "reward": 1, "extra": 2}):
            r = c.post("/v2/models/churn/feedback", json=bad)
            assert r.status_code == 400 and r.json()["error"], bad
        assert c.post("/v2/models/nope/feedback", json={"id": rid, "reward": 1}).status_code == 404
        report = {v["variant"]: v for v in c.get("/v2/routes/churn/report").json()["variants"]}
        assert report[variant]["reward"]["n"] == 1 and report[variant]["reward"]["mean"] == 0.75
        # Ids past the limit are forgotten, and said to be expired.
        monkeypatch.setattr(feedback_module, "FEEDBACK_IDS", 5)
        ids = [c.post("/v2/models/churn/infer", json=body()).json()["id"] for _ in range(12)]
        old = [c.post("/v2/models/churn/feedback", json={"id": i, "reward": 1}) for i in ids[:7]]
        assert all(r.status_code == 404 for r in old)
        assert any("has expired" in r.json()["error"] for r in old)
        assert c.post("/v2/models/churn/feedback", json={"id": ids[-1], "reward": 1}).status_code == 200


def test_label_feedback_gives_accuracy() -> None:
    routes = {"cls": {"variants": [{"model": "good:1", "weight": 50}, {"model": "bad:1", "weight": 50}]}}
    with route_server({"good:1": Labeller(0.0), "bad:1": Labeller(100.0)}, routes) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        for i in range(60):
            x = float(i % 2) * 2 - 1  # -1 or 1; the truth is x > 0
            r = c.post("/v2/models/cls/infer", json=body(x))
            truth = int(x > 0)
            fb = c.post("/v2/models/cls/feedback", json={"id": r.json()["id"], "label": truth})
            assert fb.status_code == 200, fb.text
            assert fb.json()["correct"] == (r.headers["modelpod-variant"] == "good:1" or truth == 0)
        rows = {v["variant"]: v for v in c.get("/v2/routes/cls/report").json()["variants"]}
        assert rows["good:1"]["accuracy"]["value"] == 1.0
        assert 0.0 < rows["bad:1"]["accuracy"]["value"] < 1.0
        r = c.post("/v2/models/cls/infer", json=body(1.0, rows=2))
        fb = c.post("/v2/models/cls/feedback", json={"id": r.json()["id"], "label": [1]})
        assert fb.status_code == 400 and "row" in fb.json()["error"]


def test_grpc_answers_carry_the_variant_as_trailing_metadata() -> None:
    grpc = pytest.importorskip("grpc")
    from modelpod.protocols._generated import open_inference_pb2 as pb

    sticky = {"churn": {**SPLIT["churn"], "sticky": {"header": "x-user-id"}}}
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, sticky, grpc=True) as live, \
            grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        seen = Counter()
        by_key: dict[str, set[str]] = {}
        for i in range(300):
            req = pb.ModelInferRequest(model_name="churn")
            t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
            t.contents.fp32_contents.extend([1.0, 2.0])
            key = f"k{i % 60}"  # 60 keys: all on churn:2 has a chance of 0.9^60 = 0.2 %
            resp, info = call.with_call(req, metadata=(("x-user-id", key),), timeout=30)
            variant = dict(info.trailing_metadata())["modelpod-variant"]
            assert variant == f"churn:{resp.model_version}" and resp.id
            seen[variant] += 1
            by_key.setdefault(key, set()).add(variant)
        assert all(len(v) == 1 for v in by_key.values())
        assert set(seen) == {"churn:2", "churn:3"}


def test_a_variant_that_cannot_serve_leaves_the_route_on_the_others() -> None:
    with route_server({"churn:2": Offset(0), "churn:3": Offset(100)}, SPLIT) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        entry = live.engine.registry.versions("churn")[3]
        live.call(lambda: live.engine.registry.unload(entry, reason="unloaded"))
        assert set(variants_of(c, "/v2/models/churn/infer", 100)) == {"churn:2"}
        shown = c.get("/v2/routes/churn").json()
        assert shown["status"].startswith("degraded") and "churn:3" in shown["status"]
        assert np.isclose(shown["share"]["churn:3"], 0.1)  # the weight stays; the traffic goes elsewhere
