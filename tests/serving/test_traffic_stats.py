"""The report's numbers against a hand computation on a fixed sample, and the statistics under them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from traffic_util import Offset

from modelpod.serving import feedback
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.stats import LATENCY_WINDOW, Moments, VariantStats, mean_ci, msprt_p, percentile, window
from modelpod.settings import Settings

BASE_LAT_S = [0.001 * i for i in range(1, 11)]  # 1..10 ms
BASE_REWARDS = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]  # mean 0.6
CAND_REWARDS = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]  # mean 0.9


def test_percentiles_by_linear_interpolation() -> None:
    # Ranks 0..9: p50 sits halfway between the 5th and 6th values, p95 at rank 8.55, p99 at 8.91.
    values = [float(i) for i in range(1, 11)]
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_mean_and_interval_by_hand() -> None:
    m = Moments()
    for r in BASE_REWARDS:
        m.add(r)
    # mean 6/10; variance (6 - 36/10) / 9 = 0.26667; half width 1.96 * sqrt(0.26667 / 10) = 0.32006
    out = mean_ci(m)
    assert out["n"] == 10 and out["mean"] == pytest.approx(0.6)
    assert out["ci"] == pytest.approx([0.279939, 0.920061], abs=1e-5)
    assert mean_ci(Moments())["ci"] is None


def test_msprt_by_hand_and_always_valid_minimum() -> None:
    a, b = Moments(), Moments()
    for r in BASE_REWARDS:
        a.add(r)
    for r in CAND_REWARDS:
        b.add(r)
    # v = 0.26667/10 + 0.1/10 = 0.036667; tau^2 = pooled variance = 0.18333; delta = 0.3
    # Lambda = sqrt(v / (v + tau^2)) * exp(tau^2 delta^2 / (2 v (v + tau^2))) = 0.408248 * e^1.022727 = 1.135242
    assert msprt_p(a, b) == pytest.approx(1 / 1.135242, abs=1e-5)
    # A large, clear difference gives a small p-value; no difference gives 1.
    big_a, big_b = Moments(), Moments()
    for i in range(400):
        big_a.add(i % 2)  # mean 0.5
        big_b.add(1 if i % 10 else 0)  # mean 0.9
    p = msprt_p(big_a, big_b)
    assert p is not None and p < 1e-6
    assert msprt_p(big_a, big_a) == 1.0
    assert msprt_p(Moments(), big_b) is None


def test_latency_window_keeps_the_newest() -> None:
    st = VariantStats()
    for i in range(LATENCY_WINDOW + 5):
        st.observe(True, float(i))
    mark = st.snapshot()
    assert len(st.latencies_since()) == LATENCY_WINDOW and st.latencies_since()[0] == 5.0
    st.observe(False, 1e6)
    st.observe(True, 2e6)
    w = window(st, mark)
    assert w["requests"] == 2 and w["errors"] == 1 and w["error_rate"] == 0.5
    assert st.latencies_since(mark.pos) == [1e6, 2e6]


def test_report_numbers_on_a_fixed_sample() -> None:
    engine = InferenceEngine(Settings())
    engine.config = ServeConfig.from_settings(Settings(), {"routes": {"churn": {
        "variants": [{"model": "churn:2", "weight": 80}, {"model": "churn:3", "weight": 20}]}}})
    engine.add_model(Offset(0), name="churn", version=2)
    engine.add_model(Offset(1), name="churn", version=3)
    engine.configure_routes()
    route = engine.traffic.routes["churn"]
    base, cand = route.stats["churn:2"], route.stats["churn:3"]
    for s in BASE_LAT_S:
        base.observe(True, s)
    for i, s in enumerate(BASE_LAT_S):
        cand.observe(i not in (3, 7), 2 * s)  # 2 of 10 failed; 2..20 ms
    for r in BASE_REWARDS:
        base.rewards.add(r)
    for r in CAND_REWARDS:
        cand.rewards.add(r)
    rep = feedback.report(route)
    rows = {v["variant"]: v for v in rep["variants"]}
    b, c = rows["churn:2"], rows["churn:3"]
    assert rep["baseline"] == "churn:2" and b["role"] == "baseline" and c["role"] == "variant"
    assert (b["requests"], b["errors"], b["error_rate"]) == (10, 0, 0.0)
    assert (c["requests"], c["errors"], c["error_rate"]) == (10, 2, 0.2)
    assert b["latency_ms"] == pytest.approx({"p50": 5.5, "p95": 9.55, "p99": 9.91})
    assert c["latency_ms"] == pytest.approx({"p50": 11.0, "p95": 19.1, "p99": 19.82})
    assert b["share"] == pytest.approx(0.8) and c["share"] == pytest.approx(0.2)
    assert b["reward"]["mean"] == pytest.approx(0.6) and b["reward"]["ci"] == pytest.approx([0.279939, 0.920061],
                                                                                             abs=1e-5)
    # candidate: variance (9 - 8.1) / 9 = 0.1; half width 1.96 * 0.1 = 0.195996
    assert c["reward"]["ci"] == pytest.approx([0.704004, 1.095996], abs=1e-5)
    vs = c["vs_baseline"]
    assert vs["reward_delta"] == pytest.approx(0.3)
    assert vs["reward_p_value"] == pytest.approx(0.880869, abs=1e-5)
    # errors as 0/1: v = 0 + 0.17778/10; tau^2 = 9 * 0.17778 / 18 = 0.088889; delta 0.2
    # Lambda = sqrt(0.017778 / 0.106667) * exp(0.088889 * 0.04 / (2 * 0.017778 * 0.106667))
    #        = 0.408248 * e^0.9375 = 1.042500
    assert vs["error_rate_delta"] == pytest.approx(0.2)
    assert vs["error_rate_p_value"] == pytest.approx(1 / 1.042500, abs=1e-5)
    # The p-value is a running minimum: more data that looks like no difference cannot raise it.
    for _ in range(50):
        base.rewards.add(1)
        cand.rewards.add(1)
    again = {v["variant"]: v for v in feedback.report(route)["variants"]}["churn:3"]["vs_baseline"]
    assert again["reward_p_value"] == pytest.approx(0.880869, abs=1e-5)
    assert math.isclose(route.pmin[("churn:2", "churn:3", "reward")], again["reward_p_value"])


def test_answers_keep_made_up_and_client_ids_in_two_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedback, "FEEDBACK_IDS", 4)
    ids = feedback.Answers()
    out = {"y": np.zeros((1, 2), dtype=np.float32)}
    made = [ids.keep(None, "m:1", out, float(i)) for i in range(3)]
    assert made[0].startswith(ids.prefix) and len(set(made)) == 3
    assert ids.keep("client-1", "m:2", out, 3.0) == "client-1"  # the 4th answer: the newer generation is full
    assert ids.find(made[1]) == (True, ("m:1", 1.0, out)) and ids.find("client-1") == (True, ("m:2", 3.0, out))
    ids.answered(made[1])
    assert ids.find(made[1]) == (True, None)  # joined once: a second outcome is refused
    later = [ids.keep(None, "m:1", out, 4.0 + i) for i in range(4)]  # fills the newer again: the first 4 go
    for gone in (*made, "client-1"):
        assert ids.find(gone) == (False, None) and ids.expired(gone)
    assert ids.find(later[-1])[0] and len(ids) == 4
    # Never made here: unknown, not expired (a made-up-looking id past the last number, or another prefix).
    for never in (f"{ids.prefix}{10**6}", f"{ids.prefix}x", "other-1", "client-2"):
        assert ids.find(never) == (False, None) and not ids.expired(never)
    big = {"y": np.zeros(feedback.KEEP_OUTPUT_BYTES // 4 + 1, dtype=np.float32)}
    assert ids.find(ids.keep(None, "m:1", big, 9.0)) == (True, ("m:1", 9.0, None))  # too large: reward only
