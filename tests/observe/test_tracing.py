"""Tracing: traceparent in and out over REST and gRPC, the request/queue/batch/predict spans, log lines,
and OTLP/HTTP export to a real receiver on loopback (decoded with opentelemetry-proto)."""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import PYTHON, EchoModel, GatedModel, LiveServer, ServeProcess, echo_request, wait_for

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelpod.observe.tracing import Tracing, parse_traceparent
from modelpod.serving import logs
from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import PodRecord

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
X = np.arange(4, dtype=np.float32).reshape(2, 2)


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[LiveServer, InMemorySpanExporter, GatedModel]]:
    exporter = InMemorySpanExporter()
    gated = GatedModel()
    gated.gate.set()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1, policy=BatchPolicy(max_batch_rows=8))
        engine.add_model(gated, name="gated", version=1, policy=BatchPolicy(max_batch_rows=8, max_concurrency=1))
        engine.observe.tracing = Tracing.with_exporter(exporter)

    with LiveServer(Settings(), setup, grpc=True) as live:
        yield live, exporter, gated


def _spans(exporter: InMemorySpanExporter, trace_id: int) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def test_traceparent_parsing_accepts_w3c_and_refuses_the_rest() -> None:
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-01") == (int(TRACE, 16), int(PARENT, 16), 1)
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-00-future") is not None  # later versions may add fields
    for bad in ("", "garbage", f"00-{TRACE}-{PARENT}", f"ff-{TRACE}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01",
                f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE.upper()}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01-extra",
                f"00-{TRACE[:-1]}-{PARENT}-01"):
        assert parse_traceparent(bad) is None, bad


def test_rest_request_continues_the_callers_trace(traced: tuple[LiveServer, InMemorySpanExporter, GatedModel]) -> None:
    live, exporter, _ = traced
    r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X),
                   headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=30)
    assert r.status_code == 200
    assert r.headers["modelpod-trace-id"] == TRACE
    version, trace_id, span_id, flags = r.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01") and span_id != PARENT

    spans = wait_for(lambda: (lambda s: s if len(s) >= 4 else None)(_spans(exporter, int(TRACE, 16))), 10, "spans")
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v2/models/{model}/infer"]
    assert server.parent is not None and server.parent.span_id == int(PARENT, 16) and server.parent.is_remote
    assert f"{server.context.span_id:016x}" == span_id
    assert server.attributes["modelpod.model"] == "echo" and server.attributes["http.response.status_code"] == 200
    assert by_name["queue"].parent.span_id == server.context.span_id
    batch = by_name["batch"]
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    assert by_name["predict"].parent.span_id == batch.context.span_id
    assert batch.attributes["modelpod.batch.rows"] == 2


def test_a_batch_links_every_request_in_it(traced: tuple[LiveServer, InMemorySpanExporter, GatedModel]) -> None:
    live, exporter, gated = traced
    gated.gate.clear()
    traces = [f"{i + 1:032x}" for i in range(4)]

    def call(trace_id: str) -> httpx.Response:
        return httpx.post(f"{live.url}/v2/models/gated/infer", json=echo_request(X[:1]),
                          headers={"traceparent": f"00-{trace_id}-{PARENT}-01"}, timeout=30)

    before = gated.entered
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(call, traces[0])
        wait_for(lambda: gated.entered > before, 10, "the first batch to start")  # the model is busy now
        rest = [pool.submit(call, t) for t in traces[1:]]
        engine = live.engine
        wait_for(lambda: engine.registry.versions("gated")[1].batcher.queue_depth == 3, 10, "three queued")
        gated.gate.set()
        answers = [first.result(), *(f.result() for f in rest)]
    assert all(a.status_code == 200 for a in answers)
    wanted = {int(t, 16) for t in traces[1:]}

    def joint_batch() -> Any:
        for s in exporter.get_finished_spans():
            if s.name == "batch" and {link.context.trace_id for link in s.links} == wanted:
                return s
        return None

    batch = wait_for(joint_batch, 10, "the batch of three")
    servers = {s.context.span_id for s in exporter.get_finished_spans()
               if s.kind.name == "SERVER" and s.context.trace_id in wanted}
    assert {link.context.span_id for link in batch.links} == servers and len(servers) == 3
    assert batch.attributes["modelpod.batch.requests"] == 3


def test_malformed_traceparent_is_ignored(traced: tuple[LiveServer, InMemorySpanExporter, GatedModel]) -> None:
    live, _, _ = traced
    r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X),
                   headers={"traceparent": "00-not-a-trace-01"}, timeout=30)
    assert r.status_code == 200
    trace_id = r.headers["modelpod-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16) != 0  # a new trace, not an error


def test_errors_are_traced_and_marked(traced: tuple[LiveServer, InMemorySpanExporter, GatedModel]) -> None:
    live, exporter, _ = traced
    r = httpx.post(f"{live.url}/v2/models/echo/infer", content=b"{not json",
                   headers={"traceparent": f"00-{'ab' * 16}-{PARENT}-01"}, timeout=30)
    assert r.status_code == 400 and r.headers["modelpod-trace-id"] == "ab" * 16
    span = wait_for(lambda: next(iter(_spans(exporter, int("ab" * 16, 16))), None), 10, "the span")
    assert span.attributes["http.response.status_code"] == 400


def test_grpc_takes_traceparent_from_metadata(traced: tuple[LiveServer, InMemorySpanExporter, GatedModel]) -> None:
    grpc = pytest.importorskip("grpc")
    from modelpod.protocols._generated import open_inference_pb2 as pb

    live, exporter, _ = traced
    trace_id = "cd" * 16
    req = pb.ModelInferRequest(model_name="echo")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend(X.reshape(-1).tolist())
    with grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        _, info = call.with_call(req, metadata=(("traceparent", f"00-{trace_id}-{PARENT}-01"),), timeout=30)
    trailing = dict(info.trailing_metadata())
    assert trailing["modelpod-trace-id"] == trace_id and trailing["traceparent"].startswith(f"00-{trace_id}-")
    spans = wait_for(lambda: (lambda s: s if len(s) >= 4 else None)(_spans(exporter, int(trace_id, 16))), 10, "spans")
    server = next(s for s in spans if s.kind.name == "SERVER")
    assert server.name == "/inference.GRPCInferenceService/ModelInfer" and server.parent.span_id == int(PARENT, 16)
    assert {s.name for s in spans} >= {"queue", "batch", "predict"}


def test_log_lines_carry_the_trace_id(traced: tuple[LiveServer, InMemorySpanExporter, GatedModel]) -> None:
    live, _, _ = traced
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("modelpod.serving")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X),
                       headers={"traceparent": f"00-{'ef' * 16}-{PARENT}-01", "x-request-id": "log-me"}, timeout=30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert r.status_code == 200
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    mine = [line for line in lines if line.get("request_id") == "log-me"]
    assert mine and all(line["trace_id"] == "ef" * 16 and len(line["span_id"]) == 16 for line in mine)


def test_no_spans_and_no_headers_when_tracing_is_off() -> None:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    with LiveServer(Settings(), setup) as live:
        r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X),
                       headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=30)
        batcher = live.engine.registry.versions("echo")[1].batcher
        assert batcher is not None and batcher.tracing is None
    assert r.status_code == 200 and "traceparent" not in r.headers and "modelpod-trace-id" not in r.headers


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest into the server's list."""

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        msg = ExportTraceServiceRequest.FromString(body)
        self.server.got.append((self.path, self.headers.get("content-type"), msg))  # type: ignore[attr-defined]
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def test_otlp_http_export_to_a_real_receiver(served_home: tuple[Path, PodRecord]) -> None:
    home, _ = served_home
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    receiver.got = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    env = {"MODELPOD_HOME": str(home), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}",
           "OTEL_SERVICE_NAME": "fraud-scorer", "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_SAMPLER": "always_on"}
    server = ServeProcess([str(PYTHON), "-m", "modelpod", "serve", "lr", "--port", "0", "--no-grpc", "--json"], env)
    try:
        x = np.zeros((1, 20), dtype=np.float32)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 20], "data": x.reshape(-1).tolist()}]}
        name = json.loads(httpx.get(f"{server.url}/v2/models/lr", timeout=30).text)["inputs"][0]["name"]
        body["inputs"][0]["name"] = name
        r = httpx.post(f"{server.url}/v2/models/lr/infer", json=body,
                       headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=30)
        assert r.status_code == 200 and r.headers["modelpod-trace-id"] == TRACE

        def exported() -> Any:
            spans = [(rs, s) for _, _, msg in list(receiver.got) for rs in msg.resource_spans
                     for ss in rs.scope_spans for s in ss.spans if s.trace_id.hex() == TRACE]
            return spans if {s.name for _, s in spans} >= {"queue", "batch", "predict"} else None

        spans = wait_for(exported, 30, "the spans at the receiver")
    finally:
        server.stop()
        receiver.shutdown()
        receiver.server_close()
    paths = {p for p, _, _ in receiver.got}
    assert paths == {"/v1/traces"} and all(ct == "application/x-protobuf" for _, ct, _ in receiver.got)
    resource = {a.key: a.value.string_value for a in spans[0][0].resource.attributes}
    assert resource["service.name"] == "fraud-scorer"
    server_span = next(s for _, s in spans if s.name.startswith("POST"))
    assert server_span.parent_span_id.hex() == PARENT


def test_otel_variables_turn_tracing_on_and_off() -> None:
    from modelpod.errors import UsageError
    from modelpod.observe.hub import tracing_from_env
    from modelpod.observe.tracing import RateLimitedSampler, resource_from_env, sampler_from_env

    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}) is None
    on = tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert on is not None
    on.shutdown()
    with pytest.raises(UsageError, match="http/protobuf"):
        tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(UsageError, match="OTEL_TRACES_SAMPLER"):
        sampler_from_env({"OTEL_TRACES_SAMPLER": "sometimes"})
    assert "TraceIdRatioBased{0.25}" in sampler_from_env(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}).get_description()
    assert "RateLimitedSampler" in sampler_from_env({}).get_description()
    resource = resource_from_env({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=risk",
                                  "OTEL_SERVICE_NAME": "scorer"}).attributes
    assert resource["service.name"] == "scorer" and resource["team"] == "risk"
    limited = RateLimitedSampler(2)
    decisions = [limited.should_sample(None, 1, "x").decision.is_sampled() for _ in range(10)]
    assert decisions[:2] == [True, True] and not all(decisions)  # a burst is cut at the rate


def test_payload_log_records_carry_the_trace_id(tmp_path: Path) -> None:
    from modelpod.observe.payload import parse_specs

    exporter = InMemorySpanExporter()
    sink = tmp_path / "p.jsonl"

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)
        engine.observe.tracing = Tracing.with_exporter(exporter)
        engine.observe.configure_payload(parse_specs({"": {"sink": str(sink), "sample": 1}}))

    with LiveServer(Settings(), setup) as live:
        r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X),
                       headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=30)
        assert r.status_code == 200
        wait_for(lambda: sink.exists() and sink.read_text().endswith("\n"), 10, "the payload line")
    assert json.loads(sink.read_text().splitlines()[0])["trace_id"] == TRACE


def test_default_sampling_follows_the_caller_and_makes_no_span_when_not_sampled() -> None:
    from modelpod.observe.tracing import RateLimitedSampler

    exporter = InMemorySpanExporter()

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)
        tracing = Tracing.with_exporter(exporter)
        tracing.roots = RateLimitedSampler(0.0)  # one new trace, then none (as from_env sets it up, at 10/s)
        engine.observe.tracing = tracing

    with LiveServer(Settings(), setup) as live:
        def infer(headers: dict[str, str]) -> httpx.Response:
            r = httpx.post(f"{live.url}/v2/models/echo/infer", json=echo_request(X), headers=headers, timeout=30)
            assert r.status_code == 200
            return r

        unsampled = infer({"traceparent": f"00-{TRACE}-{PARENT}-00"})
        assert unsampled.headers["modelpod-trace-id"] == TRACE and unsampled.headers["traceparent"].endswith("-00")
        first, second = infer({}), infer({})
        sampled = infer({"traceparent": f"00-{'12' * 16}-{PARENT}-01"})
        wait_for(lambda: len({s.context.trace_id for s in exporter.get_finished_spans()}) >= 2, 10, "two traces")
    traces = {s.context.trace_id for s in exporter.get_finished_spans()}
    assert int(TRACE, 16) not in traces  # the caller did not sample it: no span at all
    assert int("12" * 16, 16) in traces and int(first.headers["modelpod-trace-id"], 16) in traces
    assert int(second.headers["modelpod-trace-id"], 16) not in traces  # over the rate: ids, no spans
    assert second.headers["modelpod-trace-id"] != first.headers["modelpod-trace-id"]
    assert sampled.headers["traceparent"].endswith("-01")


class _OldBucket:
    """The root sampler as it was before its fast path: the bucket refilled on every call."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.tokens, self.last = max(0.0, rate), max(1.0, rate), now

    def take(self, now: float) -> bool:
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def test_root_sampler_fast_path_decides_as_a_bucket_refilled_on_every_call() -> None:
    from functools import partial
    from operator import getitem
    from random import Random

    from modelpod.observe.tracing import RateLimitedSampler

    rng = Random(16)
    for case in range(40):
        # Rates and times in powers of two: the float sums are exact, so both must agree on every call.
        rate = rng.choice([0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 64.0])
        clock = [float(rng.randrange(0, 1 << 10)) / 64]
        sampler = RateLimitedSampler(rate, clock=partial(getitem, clock, 0))
        old = _OldBucket(rate, clock[0])
        got, want = [], []
        for _ in range(400):
            clock[0] += rng.choice([0.0, 0.0, 1 / 1024, 1 / 64, 1 / 8, 0.5, 3.0])
            got.append(sampler.take())
            want.append(old.take(clock[0]))
        assert got == want, (case, rate)
        assert rate == 0.0 or any(want) and not all(want) or rate >= 64.0


def test_unsampled_requests_get_ids_and_headers_but_no_span() -> None:
    import asyncio

    from modelpod.observe.context import SPAN
    from modelpod.observe.context import TRACE as CURRENT
    from modelpod.observe.serving import traced_rest
    from modelpod.observe.tracing import RateLimitedSampler
    from modelpod.protocols.wire import Request, Response

    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter)
    tracing.roots = RateLimitedSampler(0.0)
    assert tracing.roots.take()  # its one token spent: nothing more is sampled
    seen: list[Any] = []

    async def answer(req: Request) -> Response:
        seen.append((CURRENT.get(), SPAN.get()))
        return Response(201, b"{}", headers=[("x-kept", "1")])

    async def main() -> list[Response]:
        out = []
        for headers in ({}, {"traceparent": f"00-{TRACE}-{PARENT}-00"}, {"traceparent": "bad"}, {}):
            req = Request("POST", "/v2/models/m/infer", "", headers, b"", True, 0.0)
            out.append(await traced_rest(tracing, req, answer))
        assert CURRENT.get() is None and SPAN.get() is None
        return out

    answers = asyncio.run(main())
    assert exporter.get_finished_spans() == ()
    trace_ids = set()
    for r, (trace, span) in zip(answers, seen, strict=True):
        assert r.status == 201 and r.body == b"{}" and span is None
        head = dict(r.headers or ())
        assert head["x-kept"] == "1" and head["modelpod-trace-id"] == trace[0]
        assert head["traceparent"] == f"00-{trace[0]}-{trace[1]}-00" == f"00-{trace[0]}-{trace[1]}-{trace[2]}"
        assert parse_traceparent(head["traceparent"]) is not None
        assert len(trace[0]) == 32 and len(trace[1]) == 16 and int(trace[1], 16) != 0
        trace_ids.add(trace[0])
    assert seen[1][0][0] == TRACE and seen[1][0][1] != PARENT  # the caller's trace, a span id of ours
    assert len(trace_ids) == 4
    tracing.shutdown()
