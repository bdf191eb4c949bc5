"""Scoped tokens: scopes, models, hashed tokens, rate limits (REST and gRPC together), no token in logs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from servutil import EchoModel, LiveServer, TextModel, echo_request, metric_value

from modelpod.errors import ForbiddenError, RateLimitedError, UnauthorizedError, UsageError
from modelpod.protocols.auth import SCOPES, Auth, Bucket, Grant, digest, parse_table
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

grpc = pytest.importorskip("grpc")
from modelpod.protocols._generated import open_inference_pb2 as pb  # noqa: E402

OPS, CHURN, READER, SLOW, SHARED = ("ops-secret-5c1f", "churn-secret-a9d2", "reader-secret-77e0",
                                    "slow-secret-0b3e", "shared-secret-4e8a")
ALL_TOKENS = (OPS, CHURN, READER, SLOW, SHARED)
TABLE = f"""
rate: 1000
burst: 1000
tokens:
  - name: ops
    token: {OPS}
    scopes: [infer, read, manage]
  - name: churn-app
    sha256: {hashlib.sha256(CHURN.encode()).hexdigest()}
    scopes: [infer]
    models: [echo]
  - name: reader
    token: {READER}
    scopes: [read]
  - name: slow
    token: {SLOW}
    scopes: [infer]
    rate: 0.001
    burst: 2
  - name: shared
    token: {SHARED}
    scopes: [infer]
    rate: 0.001
    burst: 2
"""
X = np.arange(4, dtype=np.float32).reshape(2, 2)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    path.write_text(TABLE)

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)
        engine.add_model(TextModel(), name="text", version=1)

    with LiveServer(Settings(token_file=path), setup, grpc=True) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def infer(client: httpx.Client, token: str | None, model: str = "echo") -> httpx.Response:
    body = echo_request(X) if model == "echo" else {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    return client.post(f"/v2/models/{model}/infer", json=body, headers=bearer(token) if token else None)


def test_health_is_open_and_everything_else_needs_a_known_token(client: httpx.Client) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert client.get(path).status_code == 200
    for headers in (None, bearer("not-a-token"), {"Authorization": f"Basic {OPS}"}, {"Authorization": OPS}):
        r = client.get("/v2/models/echo", headers=headers)
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert infer(client, None).status_code == 401


def test_scopes(client: httpx.Client) -> None:
    # ops: everything
    assert infer(client, OPS).status_code == 200
    assert client.get("/v2/models/echo", headers=bearer(OPS)).status_code == 200
    assert client.get("/metrics", headers=bearer(OPS)).status_code == 200
    assert client.post("/v2/repository/index", json={}, headers=bearer(OPS)).status_code == 200
    assert client.get("/v2/routes", headers=bearer(OPS)).status_code == 200
    # reader: metadata, readiness, metrics; no inference, no management
    assert client.get("/v2/models/echo", headers=bearer(READER)).status_code == 200
    assert client.get("/v2/models/echo/ready", headers=bearer(READER)).status_code == 200
    assert client.get("/metrics", headers=bearer(READER)).status_code == 200
    assert client.get("/v1/models/echo", headers=bearer(READER)).status_code == 200
    r = infer(client, READER)
    assert r.status_code == 403 and "no 'infer' scope" in r.json()["error"] and "reader" in r.json()["error"]
    for r in (client.post("/v2/repository/index", json={}, headers=bearer(READER)),
              client.post("/v2/repository/models/echo/unload", json={}, headers=bearer(READER)),
              client.get("/v2/routes", headers=bearer(READER))):
        assert r.status_code == 403 and "'manage'" in r.json()["error"]


def test_hashed_token_limited_to_a_model(client: httpx.Client) -> None:
    assert infer(client, CHURN).status_code == 200
    r = infer(client, CHURN, "text")
    assert r.status_code == 403 and "may not use model 'text'" in r.json()["error"]
    r = client.get("/v2/models/echo", headers=bearer(CHURN))
    assert r.status_code == 403 and "no 'read' scope" in r.json()["error"]


def test_model_limited_token_may_not_use_what_covers_every_model(tmp_path: Path) -> None:
    auth = Auth(parse_table({"tokens": [{"token": "t0k", "scopes": list(SCOPES), "models": ["a"]}]}, "x"))
    assert auth.check("Bearer t0k", "read", "a").name.startswith("sha256:")
    assert auth.check("Bearer t0k", "read", None)  # the server's own metadata names no model
    with pytest.raises(ForbiddenError, match="covers every model"):
        auth.check("Bearer t0k", "read", "*")
    with pytest.raises(ForbiddenError, match="may not use model 'b'"):
        auth.check("Bearer t0k", "manage", "b")


def test_rate_limit_answers_429_with_retry_after(client: httpx.Client) -> None:
    assert [infer(client, SLOW).status_code for _ in range(2)] == [200, 200]
    r = infer(client, SLOW)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "rate limit" in r.json()["error"] and "slow" in r.json()["error"] and SLOW not in r.text
    assert infer(client, OPS).status_code == 200  # other tokens are not slowed
    metrics = client.get("/metrics", headers=bearer(OPS)).text
    assert metric_value(metrics, "modelpod_auth_refusals_total", reason="rate_limited", token="slow") >= 1


def grpc_call(port: int, method: str, request: Any, response: Any, token: str | None) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                   request_serializer=type(request).SerializeToString,
                                   response_deserializer=response.FromString)
        return call.with_call(request, metadata=(("authorization", f"Bearer {token}"),) if token else None,
                              timeout=30)


def grpc_infer(port: int, token: str | None, model: str = "echo") -> Any:
    req = pb.ModelInferRequest(model_name=model)
    if model == "echo":
        req.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend(X.reshape(-1).tolist())
    else:
        req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")
    return grpc_call(port, "ModelInfer", req, pb.ModelInferResponse, token)


def grpc_code(fn: Any, *args: Any) -> tuple[Any, str, dict[str, Any]]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    err: Any = info.value
    return err.code(), err.details(), {k: v for k, v in err.trailing_metadata() or ()}


def test_grpc_scopes_and_models(server: LiveServer) -> None:
    port = server.grpc_port
    live, _ = grpc_call(port, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse, None)
    assert live.live  # health is open
    for token in (None, "not-a-token"):
        code, details, _ = grpc_code(grpc_infer, port, token)
        assert code == grpc.StatusCode.UNAUTHENTICATED and details == "missing or wrong bearer token"
    resp, _ = grpc_infer(port, CHURN)
    assert resp.model_name == "echo"
    code, details, _ = grpc_code(grpc_infer, port, CHURN, "text")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may not use model 'text'" in details
    code, details, _ = grpc_code(grpc_infer, port, READER)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "no 'infer' scope" in details
    meta, _ = grpc_call(port, "ModelMetadata", pb.ModelMetadataRequest(name="echo"), pb.ModelMetadataResponse, READER)
    assert meta.name == "echo"
    code, _, _ = grpc_code(grpc_call, port, "ModelMetadata", pb.ModelMetadataRequest(name="echo"),
                           pb.ModelMetadataResponse, CHURN)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_rate_limit_spans_rest_and_grpc(server: LiveServer, client: httpx.Client) -> None:
    assert infer(client, SHARED).status_code == 200
    grpc_infer(server.grpc_port, SHARED)
    code, details, trailers = grpc_code(grpc_infer, server.grpc_port, SHARED)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details
    assert int(trailers["retry-after"]) >= 1 and int(trailers["grpc-retry-pushback-ms"]) > 0
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])  # type: ignore[arg-type]
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.message == details
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.ToNanoseconds() > 0
    assert infer(client, SHARED).status_code == 429


def test_no_token_appears_in_logs(server: LiveServer, client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    bad = ("wrong-9d1c3b", "Bearer-ish-77aa")
    caplog.set_level(logging.DEBUG)
    for token in (*ALL_TOKENS, *bad):
        for r in (infer(client, token), infer(client, token, "text"),
                  client.get("/v2/models/echo", headers=bearer(token)),
                  client.post("/v2/repository/index", json={}, headers=bearer(token)),
                  client.post("/v2/models/echo/infer", content=b"{not json", headers=bearer(token))):
            assert token not in r.text
        for model in ("echo", "text"):
            try:
                grpc_infer(server.grpc_port, token, model)
            except grpc.RpcError as exc:
                assert token not in str(exc.details())
    client.get("/v2/models/echo", headers={"Authorization": f"Basic {bad[0]}"})
    assert caplog.records  # the server logged (debug lines for every request)
    for record in caplog.records:
        if not record.name.startswith(("modelpod", "asyncio", "grpc")):
            continue  # the test's own clients
        text = f"{record.getMessage()} {record.__dict__!r}"
        for token in (*ALL_TOKENS, *bad):
            assert token not in text, record


# -- the table itself -------------------------------------------------------------------------------
def test_a_plain_file_is_one_token_with_every_scope(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("plain-token-1\n")
    auth = Auth.from_file(path)
    grant = auth.check("Bearer plain-token-1", "manage", "*")
    assert grant.scopes == frozenset(SCOPES) and grant.models is None and grant.bucket is None
    with pytest.raises(UnauthorizedError):
        auth.check("Bearer plain-token-", "infer")
    assert Auth.from_settings(Settings(token="x")) is not None and Auth.from_settings(Settings()) is None


@pytest.mark.parametrize("table, fragment", [
    ({"tokens": []}, "non-empty list"),
    ({"tokens": [{"token": "a", "scopes": ["infer"]}], "extra": 1}, r"unknown key\(s\) extra"),
    ({"tokens": [{"scopes": ["infer"]}]}, "give token or sha256"),
    ({"tokens": [{"token": "a", "sha256": "0" * 64, "scopes": ["infer"]}]}, "give token or sha256"),
    ({"tokens": [{"sha256": "abc", "scopes": ["infer"]}]}, "64 hex digits"),
    ({"tokens": [{"token": "a", "scopes": ["admin"]}]}, "not admin"),
    ({"tokens": [{"token": "a"}]}, "scopes must be one or more"),
    ({"tokens": [{"token": "a", "scopes": ["infer"], "rate": -1}]}, "positive number"),
    ({"tokens": [{"token": "a", "scopes": ["infer"], "rate": 1, "burst": 0.5}]}, "positive number|at least 1"),
    ({"tokens": [{"token": "a", "scopes": ["infer"]}, {"token": "a", "scopes": ["read"]}]}, "repeats the token"),
    ({"tokens": [{"name": "n", "token": "a", "scopes": ["infer"]},
                 {"name": "n", "token": "b", "scopes": ["read"]}]}, "two tokens are named 'n'"),
    ({"tokens": [{"token": "a", "scopes": ["infer"], "models": []}]}, "at least one model"),
    ({"tokens": [{"token": "secret-in-error", "scopes": ["infer"], "colour": 1}]}, "unknown key"),
])
def test_table_mistakes_are_usage_errors(table: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment) as info:
        parse_table(table, "tokens.yaml")
    assert "tokens.yaml" in str(info.value) and "secret-in-error" not in str(info.value)


def test_bucket_refills_with_the_clock() -> None:
    now = [100.0]
    auth = Auth({digest("t"): Grant("t", frozenset(SCOPES), None, Bucket(rate=2.0, burst=2.0))}, clock=lambda: now[0])
    auth.check("Bearer t", "infer")
    auth.check("Bearer t", "infer")
    with pytest.raises(RateLimitedError) as info:
        auth.check("Bearer t", "infer")
    assert info.value.http_status == 429 and info.value.retry_after_s == 1 and 0 < info.value.wait_s <= 0.5
    now[0] += 0.5  # one request's worth at 2/s
    auth.check("Bearer t", "infer")
    with pytest.raises(RateLimitedError):
        auth.check("Bearer t", "infer")
    now[0] += 60  # refills to the burst, not beyond
    auth.check("Bearer t", "infer")
    auth.check("Bearer t", "infer")
    with pytest.raises(RateLimitedError):
        auth.check("Bearer t", "infer")


def test_a_broken_table_is_refused_not_taken_as_a_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("tokens:\n  - token: leaked-3f1a\n    scopes: [infer\n")
    with pytest.raises(UsageError, match="not valid YAML") as info:
        Auth.from_file(path)
    assert "leaked-3f1a" not in str(info.value)


def test_token_new_prints_a_token_and_an_entry_that_accepts_it(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    import json

    from modelpod.cli import main

    assert main(["token", "new", "--name", "app", "--scopes", "infer,read", "--models", "echo", "--rate", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token"] not in json.dumps(out["entry"])
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": [out["entry"]]}))
    grant = Auth.from_file(path).check(f"Bearer {out['token']}", "read", "echo")
    assert grant.name == "app" and grant.bucket is not None and grant.bucket.rate == 5
    assert main(["token", "new", "--name", "x", "--scopes", "admin"]) == 2
    assert "scopes must be one or more" in capsys.readouterr().err
    assert main(["token", "new", "--name", "y"]) == 0
    text = capsys.readouterr().out
    assert "sha256:" in text and "mp_" in text
