"""KServe v1 / TensorFlow Serving REST, in the request shapes those projects document, on a live server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import EchoModel, LiveServer, TextModel
from tables import save_table_model, table_frame

from modelpod.packing import pack
from modelpod.serving.config import BatchPolicy
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import Store


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, Any]) -> Path:
    """A store of its own: ``lr`` (version 1, alias production) and the table pod ``churn``."""
    root = tmp_path_factory.mktemp("v1")
    store = Store(root / "home")
    rec = pack(sklearn_model[0], "lr", store, sample=sklearn_model[1])
    store.tag(rec.name, rec.version, "production")
    return store.home


@pytest.fixture(scope="module")
def table_pod(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d, pipe, df = save_table_model(tmp_path_factory.mktemp("v1tab") / "m")
    pack(d / "model.skops", "churn", Store(home), sample=df.head(20),
         outputs=["label", "probabilities"])
    return pipe


@pytest.fixture(scope="module")
def server(home: Path, table_pod: Any) -> Iterator[LiveServer]:
    def setup(engine: InferenceEngine) -> None:
        engine.add("lr")
        engine.add("churn")
        engine.add_model(EchoModel(), name="echo", version=1, policy=BatchPolicy(max_batch_rows=8))
        engine.add_model(TextModel(), name="text", version=1)

    with LiveServer(Settings(home=home), setup) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_row_format_instances(client: httpx.Client, sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    _, x, est = sklearn_model
    want = est.predict(x).tolist()
    paths = ("/v1/models/lr:predict", "/v1/models/lr/versions/1:predict", "/v1/models/lr/labels/production:predict")
    for path in paths:
        r = client.post(path, json={"signature_name": "serving_default", "instances": x.tolist()})
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": want}


def test_columnar_inputs(client: httpx.Client, sklearn_model: tuple[Path, np.ndarray, Any]) -> None:
    _, x, est = sklearn_model
    r = client.post("/v1/models/lr:predict", json={"inputs": x.tolist()})
    assert r.status_code == 200 and r.json() == {"outputs": est.predict(x).tolist()}


def test_named_inputs_and_several_outputs(client: httpx.Client) -> None:
    # TF Serving's row format with named inputs: a list of objects; several outputs: an object per row.
    rows = [{"x": [1.0, 2.0]}, {"x": [3.0, 4.5]}]
    r = client.post("/v1/models/echo:predict", json={"instances": rows})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [{"y": [1.0, 2.0], "batch_rows": 2}, {"y": [3.0, 4.5], "batch_rows": 2}]}
    r = client.post("/v1/models/echo:predict", json={"inputs": {"x": [[1.0, 2.0], [3.0, 4.5]]}})
    assert r.json() == {"outputs": {"y": [[1.0, 2.0], [3.0, 4.5]], "batch_rows": [2, 2]}}


def test_strings_and_b64_binary(client: httpx.Client) -> None:
    r = client.post("/v1/models/text:predict", json={"instances": ["abc", {"b64": base64.b64encode(b"xyz").decode()}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": ["ABC", "XYZ"]}


def test_table_rows_as_objects(client: httpx.Client, table_pod: Any) -> None:
    rows = table_frame(500, seed=21, unseen=True)
    instances = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                 for r in rows.to_dict(orient="records")]
    r = client.post("/v1/models/churn:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == list(table_pod.predict(rows))
    np.testing.assert_allclose([p["probabilities"] for p in preds], table_pod.predict_proba(rows), rtol=0, atol=1e-12)


def test_model_status_and_metadata(client: httpx.Client) -> None:
    r = client.get("/v1/models/lr")
    assert r.status_code == 200
    assert r.json() == {"name": "lr", "ready": True, "model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert client.get("/v1/models/lr/versions/1").json()["model_version_status"][0]["version"] == "1"
    assert client.get("/v1/models/lr/labels/production").json()["ready"] is True
    meta = client.get("/v1/models/lr/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["input-0"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["input-0"]["tensor_shape"]["dim"]] == ["-1", "20"]
    assert meta["model_spec"] == {"name": "lr", "signature_name": "", "version": "1"}
    assert set(client.get("/v1/models").json()["models"]) >= {"lr", "churn", "echo", "text"}


@pytest.mark.parametrize(("method", "path", "body", "status", "fragment"), [
    ("POST", "/v1/models/lr:predict", {}, 400, "exactly one of 'instances'"),
    ("POST", "/v1/models/lr:predict", {"instances": [], "inputs": []}, 400, "exactly one of"),
    ("POST", "/v1/models/lr:predict", {"instances": []}, 400, "non-empty list"),
    ("POST", "/v1/models/lr:predict", {"instances": [[1.0]]}, 400, "shape"),
    ("POST", "/v1/models/lr:predict", {"signature_name": "other", "instances": [[1.0]]}, 400, "serving_default"),
    ("POST", "/v1/models/echo:predict", {"instances": [{"z": [1.0, 2.0]}]}, 400, "no input(s) z"),
    ("POST", "/v1/models/text:predict", {"instances": [{"b64": "%%%"}]}, 400, "base64"),
    ("POST", "/v1/models/nope:predict", {"instances": [[1.0]]}, 404, "nope"),
    ("POST", "/v1/models/lr/versions/9:predict", {"instances": [[1.0]]}, 404, "no version"),
    ("GET", "/v1/models/lr:predict", None, 405, "POST"),
    ("POST", "/v1/models/lr:classify", {"instances": [[1.0]]}, 404, ":predict"),
])
def test_errors_are_json(client: httpx.Client, method: str, path: str, body: Any, status: int, fragment: str) -> None:
    r = client.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_same_auth_as_oip(home: Path) -> None:
    def setup(engine: InferenceEngine) -> None:
        engine.add("lr")

    with LiveServer(Settings(home=home, token="s3cret"), setup) as live, httpx.Client(base_url=live.url) as c:
        body = {"instances": [[0.0] * 20]}
        assert c.post("/v1/models/lr:predict", json=body).status_code == 401
        assert c.get("/v1/models/lr").status_code == 401
        ok = c.post("/v1/models/lr:predict", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
