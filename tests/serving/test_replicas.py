"""Process replicas behind the in-process engine: same answers as threads, healing, scaling, draining.

Every replica is a real child process (``python -m modelpod.serving.replica_child``); the models
are pods packed here from tiny synthetic ones.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from replica_pods import behave_pod, echo_pod, echo_sample, onnx_pod, torch_pod, weights_pod
from servutil import metric_value
from test_metrics import promtool_check

from modelpod.errors import InferenceError, InferenceTimeoutError, ModelNotReadyError
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.messages import InferRequest
from modelpod.serving.replicas import MAX_START_FAILURES
from modelpod.serving.server import _announce
from modelpod.settings import Settings
from modelpod.store import PodRecord

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("replica-pods")
    home = root / "home"
    out: dict[str, Any] = {"home": home, "behave": behave_pod(root, home)}
    return out


@asynccontextmanager
async def serving(home: Path, refs: list[str], models: dict[str, dict[str, Any]],
                  **settings: Any) -> AsyncIterator[InferenceEngine]:
    s = Settings(home=home, **settings)
    engine = InferenceEngine(s, ServeConfig.from_settings(s, {"models": models}))
    for ref in refs:
        engine.add(ref)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def until(check: Callable[[], Any], deadline_s: float, what: str) -> Any:
    """Poll ``check`` on the loop (the replicas report there) until truthy, or fail."""
    end = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what} after {deadline_s:g}s")
        await asyncio.sleep(0.02)


def pids(engine: InferenceEngine, name: str) -> set[int]:
    rs = engine.resolve(name).replicas
    return {r["pid"] for r in rs.describe() if r["state"] in ("idle", "busy")} if rs is not None else set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False


def x(first: float, rows: int = 1) -> InferRequest:
    arr = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + 1
    arr[0, 0] = first
    return InferRequest({"x": arr})


def metrics(engine: InferenceEngine) -> str:
    return engine.metrics.render().decode()


# -- answers ------------------------------------------------------------------------------------------
async def test_sklearn_in_processes_answers_exactly_as_in_threads(served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    rows = np.random.default_rng(5).normal(size=(40, 20)).astype(np.float32)
    answers: dict[str, list[dict[str, np.ndarray]]] = {}
    for iso in ("thread", "process"):
        async with serving(home, ["lr"], {"lr": {"isolation": iso, "replicas": 2}}) as engine:
            inp = engine.model_metadata("lr")["inputs"][0]["name"]
            outs = await asyncio.gather(*(engine.infer("lr", None, InferRequest({inp: rows[i:i + 1]}))
                                          for i in range(len(rows))))
            answers[iso] = [o.outputs for o in outs]
            if iso == "process":
                children = pids(engine, "lr")
                assert len(children) == 2 and os.getpid() not in children
                assert metric_value(metrics(engine), "modelpod_replicas", model="lr") == 2
                printed = io.StringIO()
                _announce(engine, engine.settings, 8080, None, False, printed)  # what `modelpod serve` prints
                line = next(ln for ln in printed.getvalue().splitlines() if ln.strip().startswith("replicas"))
                assert all(f"pid {p}" in line for p in children) and line.count("idle") == 2
    assert len(answers["thread"]) == len(answers["process"]) == 40
    for t, p in zip(answers["thread"], answers["process"], strict=True):
        assert set(t) == set(p)
        for k in t:
            assert t[k].dtype == p[k].dtype
            np.testing.assert_array_equal(t[k], p[k])


@pytest.mark.parametrize("kind", ["onnx", "torch"])
async def test_onnx_and_torch_in_processes_answer_as_in_threads(kind: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    rec, rows = onnx_pod(tmp_path, home) if kind == "onnx" else torch_pod(tmp_path, home)
    name = rec.name
    got = {}
    for iso in ("thread", "process"):
        async with serving(home, [name], {name: {"isolation": iso}}) as engine:
            inp = engine.model_metadata(name)["inputs"][0]["name"]
            got[iso] = (await engine.infer(name, None, InferRequest({inp: rows}))).outputs
    assert set(got["thread"]) == set(got["process"])
    for k, v in got["thread"].items():
        np.testing.assert_array_equal(v, got["process"][k])


def smaps(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes: Rss, Pss, Shared_Clean, Private_Dirty, ..."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs /proc/PID/smaps_rollup")
async def test_onnx_replicas_share_the_weights_pages(tmp_path: Path) -> None:
    """Issue 12: two replicas of an ONNX model with 64 MB of weights take at most 1.3x the PSS of one
    (template and replicas), neither holds the weights privately, and both answer as the threads do."""
    home = tmp_path / "home"
    rec, weights = weights_pod(tmp_path, home, 64)
    rows = np.random.default_rng(6).standard_normal((8, int((weights / 4) ** 0.5)), dtype=np.float32)
    requests = [InferRequest({"x": rows[i:i + 1]}) for i in range(len(rows))]
    async with serving(home, [rec.name], {rec.name: {"isolation": "thread"}}) as engine:
        expected = [(await engine.infer(rec.name, None, r)).outputs["y"] for r in requests]
    pss: dict[int, int] = {}
    for n in (1, 2):
        config = {rec.name: {"isolation": "process", "replicas": n, "max_batch_rows": 1}}
        async with serving(home, [rec.name], config) as engine:
            for _ in range(20):  # every replica answers at least one batch (bounded)
                outs = await asyncio.gather(*(engine.infer(rec.name, None, r) for r in requests))
                for got, want in zip(outs, expected, strict=True):
                    np.testing.assert_array_equal(got.outputs["y"], want)
                served = engine.resolve(rec.name).replicas.describe()  # type: ignore[union-attr]
                if len(served) == n and all(r["batches"] for r in served):
                    break
            assert len(served) == n and all(r["batches"] for r in served), served
            children = [r["pid"] for r in served]
            template = {parent(p) for p in children}
            assert len(template) == 1 and template != {os.getpid()}
            pss[n] = sum(smaps(p)["Pss"] for p in [*template, *children])
            if n == 2:
                for pid in children:
                    mem = smaps(pid)
                    assert mem["Private_Clean"] + mem["Private_Dirty"] < weights / 4, mem
    assert pss[2] <= 1.3 * pss[1], (pss, weights)


async def test_random_tensors_of_every_datatype_come_back_exactly_through_the_replicas(tmp_path: Path) -> None:
    """Concurrent requests (merged into batches, then cut back) of every datatype, every bit pattern."""
    home = tmp_path / "home"
    echo_pod(tmp_path, home)
    async with serving(home, ["echo"], {"echo": {"isolation": "process", "replicas": 2}}) as engine:
        sent = [echo_sample(rows=1 + i % 5, seed=i) for i in range(40)]
        outs = await asyncio.gather(*(engine.infer("echo", None, InferRequest(dict(s))) for s in sent))
        for inputs, out in zip(sent, outs, strict=True):
            assert set(out.outputs) == {f"{k}_out" for k in inputs}
            for name, arr in inputs.items():
                got = out.outputs[f"{name}_out"]
                assert got.dtype == arr.dtype and got.shape == arr.shape, name
                if arr.dtype.kind == "O":
                    assert got.tolist() == arr.tolist()
                else:
                    assert got.tobytes() == arr.tobytes(), name  # bit for bit: NaN payloads, -0.0
        assert sum(r["batches"] for r in engine.resolve("echo").replicas.describe()) < 40  # batches were merged


# -- the console ------------------------------------------------------------------------------------------
async def test_the_console_lists_each_replica_of_a_model_in_processes(pods: dict[str, Any]) -> None:
    async with serving(pods["home"], ["behave"], {"behave": {"isolation": "thread"}}) as engine:
        assert "replicas" not in engine.console_sections  # no replicas: no section
    async with serving(pods["home"], ["behave"], {"behave": {"isolation": "process", "replicas": 2}}) as engine:
        def settled() -> dict[str, Any] | None:
            table = dict(engine.console_sections["replicas"]())
            return table if len(table["rows"]) == 2 and all(r[3] == "idle" for r in table["rows"]) else None

        table = await until(settled, 60, "two idle replicas in the table")
        assert table["title"] == "Replicas" and table["columns"][:4] == ["model", "replica", "pid", "state"]
        assert {r[0] for r in table["rows"]} == {"behave:1"} and {r[2] for r in table["rows"]} == pids(engine, "behave")
        assert all(isinstance(r[4], float) and r[4] > 0 for r in table["rows"])  # rss MiB, as the replicas report


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])


async def test_replicas_are_forked_from_one_template_and_outlive_none_of_it(pods: dict[str, Any]) -> None:
    async with serving(pods["home"], ["behave"], {"behave": {"isolation": "process", "replicas": 2}}) as engine:
        rs = engine.resolve("behave").replicas
        assert rs is not None and rs.template is not None
        template = rs.template.proc.pid
        children = pids(engine, "behave")
        assert len(children) == 2 and {parent_of(p) for p in children} == {template} != {os.getpid()}
        os.kill(template, 9)  # the replicas follow their template; new ones come from a new template
        await until(lambda: all(not alive(p) for p in children), 30, "the replicas to follow the template")
        await until(lambda: len(pids(engine, "behave")) == 2, 60, "two new replicas")
        assert rs.template is not None and rs.template.proc.pid != template
        out = await engine.infer("behave", None, x(5))
        assert out.outputs["y"][0].tolist() == [10.0, 4.0] and parent_of(int(out.outputs["pid"][0])) != template


# -- healing --------------------------------------------------------------------------------------------
async def test_a_crashed_replica_is_replaced_and_its_batch_retried(pods: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_TEST_MARKS", str(tmp_path))
    async with serving(pods["home"], ["behave"], {"behave": {"isolation": "process", "replicas": 2}}) as engine:
        before = pids(engine, "behave")
        out = await engine.infer("behave", None, x(-2))  # its first replica dies; the retry answers
        assert out.outputs["y"][0].tolist() == [-4.0, 4.0]
        assert (tmp_path / "crashed").exists()
        await until(lambda: len(pids(engine, "behave")) == 2 and pids(engine, "behave") != before, 60,
                    "a replacement replica")
        assert len(pids(engine, "behave") & before) == 1
        text = metrics(engine)
        assert metric_value(text, "modelpod_replica_restarts_total", model="behave", reason="crashed") == 1


async def test_a_batch_that_kills_every_replica_fails_alone(pods: dict[str, Any]) -> None:
    async with serving(pods["home"], ["behave"], {"behave": {"isolation": "process", "replicas": 2}}) as engine:
        with pytest.raises(InferenceError, match="died"):
            await engine.infer("behave", None, x(-4))  # retried once, then given up
        await until(lambda: len(pids(engine, "behave")) == 2, 60, "both replicas back")
        out = await engine.infer("behave", None, x(3))
        assert out.outputs["y"][0].tolist() == [6.0, 4.0]
        assert metric_value(metrics(engine), "modelpod_replica_restarts_total", model="behave",
                            reason="crashed") == 2


async def test_a_hung_replica_is_killed_and_replaced(pods: dict[str, Any]) -> None:
    cfg = {"behave": {"isolation": "process", "timeout_s": 1.5}}
    async with serving(pods["home"], ["behave"], cfg) as engine:
        (first,) = pids(engine, "behave")
        with pytest.raises(InferenceTimeoutError):
            await engine.infer("behave", None, x(-1))
        await until(lambda: not alive(first), 30, "the hung replica to be killed")
        await until(lambda: len(pids(engine, "behave")) == 1, 60, "its replacement")
        out = await engine.infer("behave", None, x(5))
        assert out.outputs["pid"][0] != first
        assert metric_value(metrics(engine), "modelpod_replica_restarts_total", model="behave", reason="hung") == 1


async def test_a_replica_over_max_memory_is_recycled_between_batches(pods: dict[str, Any]) -> None:
    cfg = {"behave": {"isolation": "process", "max_memory": "120MiB"}}
    async with serving(pods["home"], ["behave"], cfg) as engine:
        (first,) = pids(engine, "behave")
        out = await engine.infer("behave", None, x(-3))  # grows by 128 MB, answers, then is retired
        assert out.outputs["pid"][0] == first
        await until(lambda: not alive(first), 30, "the big replica to stop")
        out = await engine.infer("behave", None, x(1))
        assert out.outputs["pid"][0] != first and out.outputs["y"][0].tolist() == [2.0, 4.0]
        assert metric_value(metrics(engine), "modelpod_replica_restarts_total", model="behave",
                            reason="memory") == 1


async def test_a_replica_that_cannot_start_backs_off_then_fails_the_model(
        pods: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("REPLICA_TEST_BREAK", "1")
    monkeypatch.setattr(logging.getLogger("modelpod"), "propagate", True)  # caplog listens at the root
    caplog.set_level(logging.INFO, logger="modelpod.serving")
    home = pods["home"]
    started = time.monotonic()
    async with serving(home, ["behave"], {"behave": {"isolation": "process"}}) as engine:
        elapsed = time.monotonic() - started
        entry = engine.resolve("behave")
        assert entry.failed and not engine.model_ready("behave")
        reason = engine.unready_reason("behave")
        assert "a_module_that_is_not_there" in reason and "ModuleNotFoundError" in reason
        # One entry per record: where an earlier test left a second handler on the way to the root,
        # caplog sees each record twice.
        starts = {(r.created, r.process, r.thread) for r in caplog.records if r.getMessage() == "replica starting"}
        assert len(starts) == MAX_START_FAILURES  # backed off, then stopped: no hot loop
        assert elapsed >= 0.5 + 1.0  # the two backoff waits between the three attempts
        with pytest.raises(ModelNotReadyError, match="a_module_that_is_not_there"):
            await engine.infer("behave", None, x(1))
        meta = engine.model_metadata("behave")
        assert meta["state"] == "UNAVAILABLE" and "a_module_that_is_not_there" in meta["reason"]


# -- scaling --------------------------------------------------------------------------------------------
async def test_scale_to_zero_then_the_next_request_is_held_not_refused(pods: dict[str, Any]) -> None:
    cfg = {"behave": {"isolation": "process", "replicas": {"min": 0, "max": 1, "downscale_delay_s": 0.3}}}
    async with serving(pods["home"], ["behave"], cfg) as engine:
        (first,) = pids(engine, "behave")  # one started at load, so a broken pod fails its load
        await until(lambda: not alive(first), 30, "the model to scale to zero")
        assert metric_value(metrics(engine), "modelpod_replicas", model="behave") == 0
        assert engine.model_ready("behave")  # zero replicas is still ready: the next request starts one
        out = await engine.infer("behave", None, x(7))
        assert out.outputs["y"][0].tolist() == [14.0, 4.0] and out.outputs["pid"][0] != first
        text = metrics(engine)
        assert metric_value(text, "modelpod_scale_events_total", model="behave", direction="down") == 1
        assert metric_value(text, "modelpod_scale_events_total", model="behave", direction="up") == 1
        promtool_check(text.encode())


async def test_load_scales_out_then_idles_back_in(pods: dict[str, Any]) -> None:
    cfg = {"behave": {"isolation": "process", "max_batch_rows": 1,
                      "replicas": {"min": 1, "max": 2, "target_inflight": 1, "upscale_delay_s": 0.1,
                                   "downscale_delay_s": 0.5}}}
    async with serving(pods["home"], ["behave"], cfg) as engine:
        stop = asyncio.Event()
        answered: list[int] = []

        async def client() -> None:
            while not stop.is_set():
                out = await engine.infer("behave", None, x(-5))  # 0.3 s each
                answered.append(int(out.outputs["pid"][0]))

        tasks = [asyncio.create_task(client()) for _ in range(6)]
        await until(lambda: len(set(answered)) == 2, 60, "a second replica to take traffic")
        stop.set()
        await asyncio.gather(*tasks)
        await until(lambda: len(pids(engine, "behave")) == 1, 30, "the idle replica to go")
        text = metrics(engine)
        assert metric_value(text, "modelpod_scale_events_total", model="behave", direction="up") >= 1
        assert metric_value(text, "modelpod_scale_events_total", model="behave", direction="down") >= 1


async def test_unload_drains_the_replicas_before_stopping_them(pods: dict[str, Any]) -> None:
    async with serving(pods["home"], ["behave"], {"behave": {"isolation": "process", "replicas": 2}}) as engine:
        children = pids(engine, "behave")
        running = [asyncio.create_task(engine.infer("behave", None, x(-6))) for _ in range(4)]
        await until(lambda: engine.inflight() == 4, 10, "requests in flight")
        await engine.unload_model("behave")
        outs = await asyncio.gather(*running)  # every request in flight was answered
        assert all(o.outputs["y"][0, 1] == 4.0 for o in outs)
        assert not any(alive(p) for p in children)
        assert engine.resolve("behave").state.value == "UNAVAILABLE"
