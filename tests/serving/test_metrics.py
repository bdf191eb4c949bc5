"""Metrics: exposition format, outcomes, and promtool's own check."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from servutil import EchoModel, metric_value

from modelpod.errors import InferenceTimeoutError, InvalidRequestError, OverloadedError
from modelpod.protocols.codec import InferRequest
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.metrics import Counter, Histogram, MetricsRegistry, outcome_of
from modelpod.settings import Settings


def promtool_check(text: bytes) -> None:
    """``promtool check metrics`` on a scrape; skipped without promtool unless required."""
    promtool = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if promtool is None:
        if os.environ.get("MODELPOD_REQUIRE_DOCKER") == "1":
            pytest.fail("promtool is required (MODELPOD_REQUIRE_DOCKER=1) but not installed")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def test_outcomes() -> None:
    assert outcome_of(None) == "success"
    assert outcome_of(OverloadedError("x")) == "overloaded"
    assert outcome_of(InferenceTimeoutError("x")) == "timeout"
    assert outcome_of(InvalidRequestError("x")) == "client_error"
    assert outcome_of(RuntimeError("x")) == "error"


def test_histogram_and_counter_text() -> None:
    reg = MetricsRegistry()
    c = Counter("modelpod_things_total", "Things.", ("model",))
    h = Histogram("modelpod_wait_seconds", "Waits.", ("model",), (0.1, 1.0))
    reg.add(c)
    reg.add(h)
    c.labels('we"ird\\').inc(2)
    for v in (0.05, 0.5, 5.0):
        h.labels("m").observe(v)
    text = reg.render().decode()
    assert 'modelpod_things_total{model="we\\"ird\\\\"} 2' in text
    assert 'modelpod_wait_seconds_bucket{model="m",le="0.1"} 1' in text
    assert 'modelpod_wait_seconds_bucket{model="m",le="1"} 2' in text
    assert 'modelpod_wait_seconds_bucket{model="m",le="+Inf"} 3' in text
    assert 'modelpod_wait_seconds_count{model="m"} 3' in text
    promtool_check(reg.render())


@pytest.mark.asyncio
async def test_engine_metrics_pass_promtool() -> None:
    engine = InferenceEngine(Settings())
    engine.add_model(EchoModel(), name="echo", version=3)
    await engine.start()
    for n in (1, 2, 3):
        await engine.infer("echo", None, InferRequest({"x": np.zeros((n, 2), dtype=np.float32)}))
    with pytest.raises(InvalidRequestError):
        await engine.infer("echo", None, InferRequest({"x": np.zeros((1, 5), dtype=np.float32)}))
    text = engine.metrics.render()
    promtool_check(text)
    s = text.decode()
    labels = {"model": "echo", "version": "3"}
    assert metric_value(s, "modelpod_requests_total", outcome="success", protocol="rest", **labels) == 3
    assert metric_value(s, "modelpod_requests_total", outcome="client_error", **labels) == 1
    assert metric_value(s, "modelpod_batch_rows_sum", **labels) == 6
    assert metric_value(s, "modelpod_model_ready", **labels) == 1
    assert metric_value(s, "modelpod_queue_depth", **labels) == 0
    assert "modelpod_model_load_duration_seconds" in s and "modelpod_model_memory_bytes" in s
    await engine.close()
