"""Payload logging: config, redaction, a rotated file sink, CloudEvents to a loopback receiver in
KServe's logger format, and sinks that are down, slow or full never slowing or failing inference."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from servutil import PYTHON, EchoModel, LiveServer, ServeProcess, echo_request, metric_value, wait_for

from modelpod.errors import UsageError
from modelpod.observe.payload import CE_REQUEST, CE_RESPONSE, REDACTED, parse_payload_log, parse_specs, redact, rotate
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import PodRecord

X = np.arange(4, dtype=np.float32).reshape(2, 2)


def _serve(specs: dict[str, Any]) -> LiveServer:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)
        engine.observe.configure_payload(parse_specs(specs))

    return LiveServer(Settings(), setup)


def _dropped(live: LiveServer, reason: str) -> float:
    return metric_value(live.engine.metrics.render().decode(), "modelpod_payload_log_dropped_total",
                        model="echo", reason=reason)


def test_config_keys_global_and_per_model() -> None:
    config = ServeConfig.from_settings(Settings(), {
        "payload_log": {"sample": 0.5, "redact": ["SSN"], "sink": "/tmp/p.jsonl"},
        "models": {"a": {"payload_log": {"sink": "http://127.0.0.1:9/"}}, "b": {"payload_log": "off"},
                   "c": {"max_batch_rows": 4}},
    })
    glob, a, b = config.payload_logs[""], config.payload_logs["a"], config.payload_logs["b"]
    assert glob is not None and glob.sample == 0.5 and glob.redact == ("ssn",) and not glob.is_url
    assert a is not None and a.is_url and a.sample == 0.5 and a.redact == ("ssn",)  # over the global keys
    assert b is None and "c" not in config.payload_logs
    for bad in ({"sample": 2, "sink": "x"}, {"sample": 0.1}, {"sink": "x", "colour": 1}, {"sink": "x", "queue": 0},
                ["x"]):
        with pytest.raises(UsageError, match="payload_log"):
            ServeConfig.from_settings(Settings(), {"payload_log": bad})
    assert parse_payload_log("file:///var/log/p.jsonl", "t") is not None
    assert parse_payload_log("file:///var/log/p.jsonl", "t").sink == "/var/log/p.jsonl"  # type: ignore[union-attr]


def test_redaction_of_tensors_and_keys_at_any_depth() -> None:
    doc = {"inputs": [{"name": "SSN", "datatype": "BYTES", "shape": [2], "data": ["1", "2"]},
                      {"name": "age", "data": [1, 2]}],
           "parameters": {"email": "a@b.c", "nested": [{"Email": "x", "keep": 1}]}}
    out = redact(doc, frozenset({"ssn", "email"}))
    assert out["inputs"][0]["data"] == [REDACTED, REDACTED] and out["inputs"][1]["data"] == [1, 2]
    assert out["parameters"] == {"email": REDACTED, "nested": [{"Email": REDACTED, "keep": 1}]}
    assert doc["inputs"][0]["data"] == ["1", "2"]  # the original is left alone


def test_file_sink_writes_pairs_and_rotates(tmp_path: Path) -> None:
    sink = tmp_path / "logs" / "payloads.jsonl"
    with _serve({"": {"sink": str(sink), "sample": 1, "max_bytes": 600, "backups": 2, "redact": ["y"]}}) as live:
        for i in range(12):
            r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X + i, id=f"req-{i}"), timeout=30)
            assert r.status_code == 200
        m = live.engine.metrics
        wait_for(lambda: metric_value(m.render().decode(), "modelpod_payload_log_records_total", model="echo") == 12,
                 10, "12 records written")
        live.engine.observe.configure_payload({})  # flushes and closes the sink
    files = sorted(tmp_path.joinpath("logs").iterdir())
    assert [f.name for f in files] == ["payloads.jsonl", "payloads.jsonl.1", "payloads.jsonl.2"]
    assert all(f.stat().st_size <= 600 for f in files)
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert 2 <= len(records) < 12  # the oldest rotated away: the size stays capped
    newest = json.loads(sink.read_text().splitlines()[-1])
    assert newest["id"] == "req-11" and newest["model"] == "echo" and newest["version"] == "1"
    assert newest["request"]["inputs"][0]["data"] == (X + 11).reshape(-1).tolist()
    outputs = {o["name"]: o for o in newest["response"]["outputs"]}
    assert outputs["y"]["data"] == [REDACTED] * 4 and outputs["batch_rows"]["data"] == [2, 2]


def test_rotate_keeps_the_newest_backups(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    for i in range(4):
        path.write_text(str(i))
        rotate(path, 2)
    assert not path.exists() and (tmp_path / "p.jsonl.1").read_text() == "3"
    assert (tmp_path / "p.jsonl.2").read_text() == "2" and not (tmp_path / "p.jsonl.3").exists()


def test_sampling_logs_about_the_share_asked(tmp_path: Path) -> None:
    sink = tmp_path / "p.jsonl"
    with _serve({"": {"sink": str(sink), "sample": 0.0}}) as live:
        for _ in range(20):
            assert httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X), timeout=30).status_code == 200
    assert not sink.exists()  # sample 0: nothing chosen


class _Events(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        srv: Any = self.server
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if srv.gate is not None:
            srv.gate.wait(30)
        srv.events.append((self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Any]:
    srv: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Events)
    srv.events, srv.gate = [], None
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    if srv.gate is not None:
        srv.gate.set()
    srv.shutdown()
    srv.server_close()


def test_url_sink_posts_kserve_cloudevents(receiver: Any) -> None:
    url = f"http://127.0.0.1:{receiver.server_port}/events"
    with _serve({"": {"sink": url, "sample": 1, "redact": ["x"], "namespace": "risk"}}) as live:
        r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X, id="ce-1"), timeout=30)
        assert r.status_code == 200
        wait_for(lambda: len(receiver.events) == 2, 10, "two CloudEvents")
    (p1, h1, b1), (p2, h2, b2) = receiver.events
    assert p1 == p2 == "/events"
    assert h1["ce-type"] == CE_REQUEST == "org.kubeflow.serving.inference.request"
    assert h2["ce-type"] == CE_RESPONSE == "org.kubeflow.serving.inference.response"
    for h in (h1, h2):
        assert h["ce-specversion"] == "1.0" and h["ce-id"] == "ce-1" and h["content-type"] == "application/json"
        assert h["ce-inferenceservicename"] == "echo" and h["ce-namespace"] == "risk"
        assert h["ce-endpoint"] == "echo:1" and h["ce-source"] and h["ce-time"].endswith("Z")
    assert b1["inputs"][0]["name"] == "x" and b1["inputs"][0]["data"] == [REDACTED] * 4
    assert b2["model_name"] == "echo" and {o["name"] for o in b2["outputs"]} == {"y", "batch_rows"}


def test_a_sink_that_is_down_never_fails_inference(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _serve({"": {"sink": f"http://127.0.0.1:{port}/", "sample": 1, "timeout_s": 0.5}}) as live:
        codes = [httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X), timeout=30).status_code
                 for _ in range(10)]
        assert codes == [200] * 10
        wait_for(lambda: _dropped(live, "sink_error") == 10, 20, "ten sink errors counted")


def test_a_slow_sink_fills_its_queue_and_drops_not_waits(receiver: Any) -> None:
    receiver.gate = threading.Event()  # the receiver holds every event until the test lets go
    url = f"http://127.0.0.1:{receiver.server_port}/"
    with _serve({"": {"sink": url, "sample": 1, "queue": 2, "timeout_s": 20}}) as live:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(
                lambda _: httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X), timeout=30).status_code,
                range(40)))
        assert codes == [200] * 40  # all answered while the sink is stuck on its first event
        assert _dropped(live, "queue_full") >= 40 - 2 - 1
        receiver.gate.set()


def test_a_full_disk_drops_and_counts(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with _serve({"": {"sink": "/dev/full", "sample": 1}}) as live:
        codes = [httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X), timeout=30).status_code
                 for _ in range(5)]
        assert codes == [200] * 5
        wait_for(lambda: _dropped(live, "sink_error") >= 1, 10, "a write error counted")


def test_serve_config_file_turns_it_on(tmp_path: Path, served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    sink = tmp_path / "pl.jsonl"
    config = tmp_path / "serve.yaml"
    config.write_text(f"payload_log: {{sample: 1, redact: [input, input-0], sink: {sink}}}\n")
    server = ServeProcess([str(PYTHON), "-m", "modelpod", "serve", "lr", "--port", "0", "--no-grpc", "--json",
                           "--config", str(config)], {"MODELPOD_HOME": str(home)})
    try:
        name = httpx.get(f"{server.url}/v2/models/lr", timeout=30).json()["inputs"][0]["name"]
        body = {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 20], "data": [0.5] * 20}]}
        assert httpx.post(f"{server.url}/v2/models/lr/infer", json=body, timeout=30).status_code == 200
        wait_for(lambda: sink.exists() and sink.stat().st_size > 0, 20, "the payload line")
    finally:
        server.stop()
    record = json.loads(sink.read_text().splitlines()[0])
    assert record["model"] == "lr" and record["request"]["inputs"][0]["data"][0] == REDACTED


def test_pick_then_put_logs_exactly_the_pairs_the_old_offer_chose(tmp_path: Path) -> None:
    """The engine draws the sample first (``pick``) and builds the record only for a chosen pair
    (``put``): the pairs written are those the one-call ``offer`` chose, in order, unchanged."""
    from random import Random

    from modelpod.observe.payload import PayloadLogger
    from modelpod.serving.metrics import Counter

    raw = {"": {"sink": str(tmp_path / "all.jsonl"), "sample": 0.3},
           "a": {"sink": str(tmp_path / "a.jsonl"), "sample": 0.7}, "b": "off"}
    specs = parse_specs(raw)
    labels = ("model", "version")
    written = Counter("t_written_total", "t", labels)
    logger = PayloadLogger(specs, written, Counter("t_dropped_total", "t", (*labels, "reason")))
    logger._random = Random(7).random
    rng = np.random.default_rng(16)
    reference = Random(7)  # the same draws, judged as offer judged them before pick existed
    expected: dict[str, list[dict[str, Any]]] = {"all.jsonl": [], "a.jsonl": []}
    for i in range(300):
        model = str(rng.choice(["a", "b", "c", "d"]))
        x = rng.normal(size=(int(rng.integers(1, 4)), 3)).astype(np.float32)
        y = (x.sum(axis=1) > 0).astype(np.int64)
        rid = f"r{i}" if i % 3 else None
        spec = specs[model] if model in specs else specs.get("")
        if spec is not None and reference.random() < spec.sample:
            expected["a.jsonl" if model == "a" else "all.jsonl"].append(
                {"model": model, "id": rid, "x": x.reshape(-1).tolist(), "y": y.tolist()})
        sink = logger.pick(model)
        if sink is not None:
            logger.put(sink, model, "1", f"{model}:1", "", rid, {"x": x}, {"y": y})
    logger.close()
    for name, want in expected.items():
        lines = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        got = [{"model": r["model"], "id": r["id"] if r["id"].startswith("r") else None,  # or a uuid4 of the sink
                "x": r["request"]["inputs"][0]["data"], "y": r["response"]["outputs"][0]["data"]} for r in lines]
        assert got == want and len(want) > 20, name
        assert all(r["request"]["id"] == r["id"] == r["response"]["id"] for r in lines)
    assert not any(r["model"] == "b" for r in map(json.loads, (tmp_path / "all.jsonl").read_text().splitlines()))
    assert logger.pick("b") is None


def _old_line(record: tuple[Any, ...], names: frozenset[str]) -> bytes:
    """A JSON Lines record as the sink wrote it before its fast path (datetime, a filtered dict)."""
    from datetime import datetime, timezone

    from modelpod.protocols.codec import tensor_to_json

    when, model, version, variant, route, rid, trace, inputs, outputs = record
    request = {"id": rid, "inputs": [tensor_to_json(n, a) for n, a in inputs.items()]}
    response: dict[str, Any] = {"model_name": model, "id": rid,
                                "outputs": [tensor_to_json(n, a) for n, a in outputs.items()]}
    if version:
        response["model_version"] = version
    stamp = datetime.fromtimestamp(when, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    doc = {"time": stamp, "id": rid, "model": model, "version": version, "variant": variant, "route": route,
           "trace_id": trace[0] if trace is not None else None,
           "request": redact(request, names), "response": redact(response, names)}
    return orjson.dumps({k: v for k, v in doc.items() if v not in (None, "")}) + b"\n"


def test_sink_lines_are_the_same_bytes_as_before_its_fast_path(tmp_path: Path) -> None:
    import uuid
    from random import Random

    from modelpod.observe.payload import PayloadLogSpec, PayloadSink, uuid4_hex
    from modelpod.serving.metrics import Counter

    rng, draw = np.random.default_rng(16), Random(16)
    for redacted in ((), ("y", "ssn")):
        spec = PayloadLogSpec(sink=str(tmp_path / "p.jsonl"), redact=redacted)
        sink = PayloadSink(spec, Counter("t1_total", "t", ("model", "version")),
                           Counter("t2_total", "t", ("model", "version", "reason")))
        try:
            for i in range(400):
                # Whole seconds, halves of a microsecond and the edge of the next second included.
                base = float(draw.randrange(0, 4_000_000_000))
                when = base + draw.choice([0.0, 0.5e-6, 1.5e-6, 0.9999995, 0.9999996, 0.4999995, draw.random()])
                x = rng.normal(size=(int(rng.integers(1, 4)), 3)).astype(draw.choice([np.float32, np.float64]))
                record = (when, draw.choice(["m", "a-b"]), draw.choice(["", "3"]), draw.choice(["", "m:3"]),
                          draw.choice(["", "route"]), f"id-{i}",
                          draw.choice([None, ("ab" * 16, "cd" * 8, "01")]),
                          {"x": x, "ssn": np.array([b"1", b"2"], dtype=object)[: len(x) % 2 + 1]},
                          {"y": (x > 0).astype(np.int64)})
                assert sink._line(record) == _old_line(record, frozenset(redacted)), record
        finally:
            sink.close(5)
    made = {uuid4_hex() for _ in range(200)}
    assert len(made) == 200
    for hex_id in made:
        parsed = uuid.UUID(hex_id)
        assert parsed.hex == hex_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122
