"""The one input check over REST and gRPC: the same request is refused the same way on both.

Each case is a request a client could send; over REST it must be a 400 (never a 500) whose error
names the reason, over gRPC INVALID_ARGUMENT with the same reason. tritonclient is used where a
real client's encoding matters (binary tensors, typed gRPC contents).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import EchoModel, LiveServer, TextModel

from modelpod.model import Batch, Model
from modelpod.pod import Signature, TensorSpec
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from modelpod.protocols._generated import open_inference_pb2 as pb  # noqa: E402


class Typed(Model):
    """An INT8 input and an FP64 input; returns them as they arrived (dtype included)."""

    signature = Signature((TensorSpec("small", "INT8", (-1,)), TensorSpec("wide", "INT64", (-1,)),
                           TensorSpec("exact", "FP64", (-1,))),
                          (TensorSpec("small", "INT8", (-1,)), TensorSpec("wide", "INT64", (-1,)),
                           TensorSpec("exact", "FP64", (-1,))))

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        return {k: np.array(v, copy=True) for k, v in inputs.items()}


class RefusesNaN(EchoModel):
    """Raises on NaN like scikit-learn does ("Input X contains NaN")."""

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        if not np.isfinite(inputs["x"]).all():
            raise ValueError("Input X contains NaN.")
        return super().predict(inputs)


class Buggy(EchoModel):
    """Fails with a traceback-looking message holding a server path: a model bug, not the client's."""

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        raise RuntimeError('Traceback (most recent call last):\n  File "/srv/secret/model_code.py", line 3\n'
                           "KeyError: 'weights'")


def typed_request(small: list[Any], wide: list[Any], exact: list[Any], types: tuple[str, str, str] = (
        "INT8", "INT64", "FP64")) -> dict[str, Any]:
    return {"inputs": [{"name": n, "datatype": t, "shape": [len(d)], "data": d}
                       for n, t, d in zip(("small", "wide", "exact"), types, (small, wide, exact), strict=True)]}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    def setup(engine: InferenceEngine) -> None:
        engine.add_model(Typed(), name="typed", version=1)
        engine.add_model(EchoModel(), name="echo", version=1)
        engine.add_model(RefusesNaN(), name="nan", version=1)
        engine.add_model(Buggy(), name="buggy", version=1)
        engine.add_model(TextModel(), name="text", version=1)

    with LiveServer(Settings(), setup, grpc=True) as live:
        yield live


@pytest.fixture
def rest(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture
def grpc_infer(server: LiveServer) -> Iterator[Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    yield lambda req: call(req, timeout=60)
    channel.close()


def to_grpc(model: str, body: Mapping[str, Any], version: str = "") -> Any:
    """The same request as a ModelInferRequest with typed contents."""
    fields = {"BOOL": "bool_contents", "INT8": "int_contents", "INT64": "int64_contents",
              "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for t in body["inputs"]:
        tensor = req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        values = t["data"]
        if t["datatype"] == "BYTES":
            values = [v.encode() for v in values]
        getattr(tensor.contents, fields[t["datatype"]]).extend(values)
    return req


def refused(r: httpx.Response, *fragments: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    for fragment in fragments:
        assert fragment in error, error
    return str(error)


def grpc_refused(call: Any, req: Any, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()


# -- datatypes and ranges ------------------------------------------------------------------------------
def test_int64_300_for_an_int8_input_is_refused_never_wrapped(rest: httpx.Client, grpc_infer: Any) -> None:
    body = typed_request([300], [1], [1.0], types=("INT64", "INT64", "FP64"))
    refused(rest.post("/v2/models/typed/infer", json=body), "'small'", "INT8", "INT64")
    grpc_refused(grpc_infer, to_grpc("typed", body), "'small'", "INT8", "INT64")
    # Declared INT8, value out of INT8's range: refused too (gRPC carries INT8 as int32 on the wire).
    body = typed_request([300], [1], [1.0])
    refused(rest.post("/v2/models/typed/infer", json=body), "'small'", "does not fit")
    grpc_refused(grpc_infer, to_grpc("typed", body), "'small'", "do not fit")


def test_fp32_or_int64_data_for_an_fp64_input_is_refused(rest: httpx.Client, grpc_infer: Any) -> None:
    for sent in ("FP32", "INT64"):
        body = typed_request([1], [1], [1] if sent == "INT64" else [1.5], types=("INT8", "INT64", sent))
        refused(rest.post("/v2/models/typed/infer", json=body), "'exact'", "expected datatype FP64", sent)
        grpc_refused(grpc_infer, to_grpc("typed", body), "'exact'", "expected datatype FP64", sent)


def test_narrower_integers_widen_losslessly(rest: httpx.Client, server: LiveServer) -> None:
    body = typed_request([-128], [-5], [0.25], types=("INT8", "INT8", "FP64"))  # INT8 data, INT64 input
    r = rest.post("/v2/models/typed/infer", json=body)
    assert r.status_code == 200, r.text
    wide = next(o for o in r.json()["outputs"] if o["name"] == "wide")
    assert wide["datatype"] == "INT64" and wide["data"] == [-5]
    # The same from tritonclient (raw tensors over gRPC).
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        inputs = []
        for name, arr in (("small", np.array([3], np.int8)), ("wide", np.array([7], np.int16)),
                          ("exact", np.array([0.5], np.float64))):
            inp = grpcclient.InferInput(name, list(arr.shape), {"int8": "INT8", "int16": "INT16"}.get(
                arr.dtype.name, "FP64"))
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        result = client.infer("typed", inputs)
        assert result.as_numpy("wide").dtype == np.int64 and result.as_numpy("wide").tolist() == [7]
    finally:
        client.close()


@pytest.mark.parametrize("data, fragment", [(["1.5"], "numbers"), ([True], "numbers"), ([1.0, False], "numbers")])
def test_fp32_takes_numbers_only(rest: httpx.Client, data: list[Any], fragment: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(data)], "data": data}]}
    if len(data) != 2:
        body["inputs"][0]["shape"] = [1, 2]
        body["inputs"][0]["data"] = data * 2
    refused(rest.post("/v2/models/echo/infer", json=body), "'x'", fragment)


def test_integers_refuse_booleans_mixed_in(rest: httpx.Client) -> None:
    body = typed_request([1, True], [1, 2], [1.0, 2.0])
    refused(rest.post("/v2/models/typed/infer", json=body), "'small'", "integers")


# -- shapes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, data, fragment", [
    ([2**62, 0], [], "larger than any request"),
    ([1] * 65, [1], "at most 64"),
    ([0, 2], [], "zero rows"),
    ([3, 2], [1, 2, 3], "elements"),
])
def test_impossible_and_empty_shapes(rest: httpx.Client, grpc_infer: Any, shape: list[int], data: list[Any],
                                     fragment: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]}
    refused(rest.post("/v2/models/echo/infer", json=body), fragment)
    grpc_fragment = "values for shape" if fragment == "elements" else fragment
    grpc_refused(grpc_infer, to_grpc("echo", body), grpc_fragment)


def test_input_count_is_checked_before_any_data_is_decoded(rest: httpx.Client) -> None:
    # 200 inputs for a one-input model, each with data that would not even decode: the count is first.
    body = {"inputs": [{"name": f"x{i}", "datatype": "FP32", "shape": [1, 2], "data": ["?", "?"]}
                       for i in range(200)]}
    refused(rest.post("/v2/models/echo/infer", json=body), "takes 1 input", "has 200")


def test_big_grpc_requests_are_decoded_in_steps(grpc_infer: Any) -> None:
    x = np.arange(300_000, dtype=np.float32).reshape(150_000, 2)
    for raw in (False, True):
        req = pb.ModelInferRequest(model_name="echo")
        t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        if raw:
            req.raw_input_contents.append(x.tobytes())
        else:
            t.contents.fp32_contents.extend(x.reshape(-1).tolist())
        req.outputs.add(name="y")
        resp = grpc_infer(req)
        y = resp.raw_output_contents[0] if raw else None
        got = np.frombuffer(y, "<f4") if y is not None else np.asarray(resp.outputs[0].contents.fp32_contents)
        np.testing.assert_array_equal(got.reshape(x.shape), x)
    req = pb.ModelInferRequest(model_name="text")
    req.inputs.add(name="text", datatype="BYTES", shape=[100_000]).contents.bytes_contents.extend([b"a"] * 100_000)
    assert list(grpc_infer(req).outputs[0].contents.bytes_contents) == [b"A"] * 100_000


# -- NaN / Infinity -------------------------------------------------------------------------------------
NAN_BODY = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [NaN, 1.0]}]}'


def test_nan_into_a_model_that_rejects_them_is_a_400(rest: httpx.Client, grpc_infer: Any) -> None:
    refused(rest.post("/v2/models/nan/infer", content=NAN_BODY), "refused the input", "contains NaN")
    req = pb.ModelInferRequest(model_name="nan")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([float("nan"), 1.0])
    grpc_refused(grpc_infer, req, "contains NaN")


def test_nonfinite_policy_per_model(rest: httpx.Client, tmp_path: Path) -> None:
    assert rest.post("/v2/models/echo/infer", content=NAN_BODY).status_code == 200  # default: passed on
    config = tmp_path / "serve.yaml"
    config.write_text("models:\n  strict:\n    nonfinite: reject\n")
    settings = Settings(config=config)

    def setup(engine: InferenceEngine) -> None:
        engine.config = ServeConfig.load(settings)  # as `modelpod serve --config` reads it
        engine.add_model(EchoModel(), name="strict", version=1)
        engine.add_model(EchoModel(), name="lenient", version=1)

    with LiveServer(settings, setup, grpc=True) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        refused(c.post("/v2/models/strict/infer", content=NAN_BODY), "NaN or Infinity", "nonfinite: reject")
        assert c.post("/v2/models/lenient/infer", content=NAN_BODY).status_code == 200
        channel = grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}")
        req = pb.ModelInferRequest(model_name="strict")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([float("inf"), 1.0])
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        grpc_refused(lambda r: call(r, timeout=60), req, "NaN or Infinity")
        channel.close()


# -- URLs, headers and parameters -----------------------------------------------------------------------
@pytest.mark.parametrize("version", ["\u00b2", "\u00b9", "\u0661"])  # ², ¹, Arabic-Indic one
def test_unicode_digits_are_not_versions(rest: httpx.Client, grpc_infer: Any, version: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    r = rest.post(f"/v2/models/echo/versions/{version}/infer", json=body)
    assert r.status_code == 404 and "no version" in r.json()["error"], r.text
    assert rest.get(f"/v2/models/echo/versions/{version}").status_code == 404
    with pytest.raises(grpc.RpcError) as info:
        grpc_infer(to_grpc("echo", body, version=version))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unicode_digits_in_a_repository_reference(rest: httpx.Client) -> None:
    r = rest.post("/v2/repository/models/echo:\u0661/load")
    assert r.status_code == 400 and "bad model reference" in r.json()["error"], r.text


def test_unicode_digits_in_the_binary_header_length(rest: httpx.Client) -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    # Header bytes are latin-1: b"\xb2" is "²", which str.isdigit() calls a digit.
    for length in (b"\xb2", b"\xb9", b"1\xb2", "\u0661".encode()):
        r = rest.post("/v2/models/echo/infer", content=header + np.zeros(2, np.float32).tobytes(),
                      headers={b"Inference-Header-Content-Length": length})
        refused(r, "Inference-Header-Content-Length")


@pytest.mark.parametrize("params", [{"binary_data_output": "false"}, {"binary_data_output": 1}])
def test_boolean_parameters_are_strict(rest: httpx.Client, params: dict[str, Any]) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}], "parameters": params}
    r = rest.post("/v2/models/echo/infer", json=body)
    refused(r, "binary_data_output", "true or false")
    body = {"inputs": body["inputs"], "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}
    refused(rest.post("/v2/models/echo/infer", json=body), "binary_data", "true or false")


# -- 500s ------------------------------------------------------------------------------------------------------
def test_a_500_names_a_request_id_and_hides_the_detail(rest: httpx.Client, grpc_infer: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    with caplog.at_level(logging.ERROR, logger="modelpod.serving"):
        r = rest.post("/v2/models/buggy/infer", json=body)
    assert r.status_code == 500
    error = r.json()["error"]
    assert "Traceback" not in error and "/srv" not in error and "model_code" not in error
    rid = r.headers["x-request-id"]
    assert f"request id {rid}" in error
    logged = [rec for rec in caplog.records if getattr(rec, "fields", {}).get("request_id") == rid]
    assert logged and "/srv/secret/model_code.py" in logged[0].fields["error"]  # type: ignore[attr-defined]
    # The client's own request id is the one named.
    r = rest.post("/v2/models/buggy/infer", json=body, headers={"X-Request-ID": "trace-500"})
    assert "request id trace-500" in r.json()["error"]
    with pytest.raises(grpc.RpcError) as info:
        grpc_infer(to_grpc("buggy", body))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "/srv" not in info.value.details() and "request id" in info.value.details()
