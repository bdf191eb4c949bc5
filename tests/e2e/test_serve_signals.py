"""Signals on a real serving process: SIGTERM twice, three times, SIGHUP, and the drain timeout."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from servutil import ServeProcess, custom_serve, echo_request, metric_value, wait_for

pytestmark = pytest.mark.e2e


def slow_server(delay_s: float, drain_timeout_s: float) -> ServeProcess:
    spec = {"models": [{"kind": "slow", "name": "slow", "args": [delay_s], "policy": {"max_batch_rows": 1}}],
            "settings": {"drain_timeout_s": drain_timeout_s}}
    return custom_serve(spec, env={"MODELPOD_LOG_LEVEL": "info"})


def in_flight(server: ServeProcess, n: int) -> tuple[list[threading.Thread], list[str]]:
    """Start ``n`` requests to the slow model; wait until all reached it. Returns (threads, outcomes)."""
    outcomes: list[str] = []

    def one() -> None:
        try:
            r = httpx.post(server.url + "/v2/models/slow/infer", json=echo_request(np.ones((1, 2))), timeout=300)
            outcomes.append(str(r.status_code))
        except httpx.TransportError:
            outcomes.append("dropped")

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()

    def accepted() -> bool:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        return metric_value(text, "modelpod_inflight_requests", model="slow") == n

    wait_for(accepted, 60, f"{n} requests in flight")
    return threads, outcomes


def logged(server: ServeProcess, fragment: str) -> Callable[[], bool]:
    return lambda: any(fragment in line for line in server.stderr)


def not_ready(server: ServeProcess) -> bool:
    try:
        return httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 503
    except httpx.TransportError:
        return False


def ignored(server: ServeProcess) -> int:
    return sum("ignored" in line for line in server.stderr)


def send(server: ServeProcess, signals: tuple[signal.Signals, ...]) -> None:
    """Signal after signal: the first turns readiness false; a second (but Ctrl-C's) is logged as ignored."""
    for i, sig in enumerate(signals):
        before = ignored(server)
        server.signal(sig)
        if i == 0:
            wait_for(lambda: not_ready(server), 30, "readiness to turn false")
        elif i == 1 and not sig == signals[0] == signal.SIGINT:
            wait_for(lambda b=before: ignored(server) > b, 30, "the second signal to be logged as ignored")
            assert server.proc.poll() is None  # still draining


@pytest.mark.parametrize("signals", [
    (signal.SIGTERM, signal.SIGTERM),  # a second SIGTERM is logged and ignored
    (signal.SIGHUP,),  # SIGHUP drains like SIGTERM
    (signal.SIGHUP, signal.SIGTERM),
], ids=["sigterm-twice", "sighup", "sighup-then-sigterm"])
def test_the_drain_finishes_what_is_in_flight(signals: tuple[signal.Signals, ...]) -> None:
    server = slow_server(delay_s=1.5, drain_timeout_s=120)
    try:
        threads, outcomes = in_flight(server, 3)
        send(server, signals)
        for t in threads:
            t.join(120)
        assert outcomes == ["200"] * 3
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("signals, drain_timeout_s", [
    ((signal.SIGTERM,) * 3, 600),  # the third ends it
    ((signal.SIGTERM,), 1),  # the drain timeout ends it
    ((signal.SIGINT, signal.SIGINT), 600),  # Ctrl-C twice
], ids=["sigterm-three-times", "drain-timeout", "ctrl-c-twice"])
def test_a_drain_that_would_never_finish_is_ended(signals: tuple[signal.Signals, ...],
                                                  drain_timeout_s: float) -> None:
    server = slow_server(delay_s=600, drain_timeout_s=drain_timeout_s)
    try:
        _, outcomes = in_flight(server, 1)
        send(server, signals)
        # The model would take ten minutes; the process ends long before that.
        assert server.proc.wait(60) == 0
        assert outcomes in ([], ["dropped"])
        assert any("drain cut short" in line for line in server.stderr)
    finally:
        server.stop()
