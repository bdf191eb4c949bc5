"""A table pod served by a real ``modelpod serve``: 500 rows, row for row equal to the pipeline's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import ServeProcess, modelpod_serve
from tables import CATEGORICAL, assert_table_answers, save_table_model, table_frame

from modelpod.packing import pack
from modelpod.store import Store

pytestmark = pytest.mark.e2e
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Any, Any]]:
    root = tmp_path_factory.mktemp("tab")
    d, pipe, _ = save_table_model(root / "m", "ignore")
    home = root / "home"
    pack(d / "model.skops", "churn", Store(home), sample=d / "sample.csv",
         outputs=["label", "probabilities"])
    rows = table_frame(500, seed=11, unseen=True)
    with modelpod_serve(home, "churn", "--grpc-port", "0") as proc:
        yield proc, pipe, rows


def columns(rows: Any, module: Any, binary: bool = False) -> list[Any]:
    inputs = []
    for name in rows.columns:
        if name in CATEGORICAL:
            arr = np.asarray(rows[name].tolist(), dtype=object)
            inp = module.InferInput(name, [len(rows)], "BYTES")
        else:
            arr = rows[name].to_numpy(dtype=np.float64)
            inp = module.InferInput(name, [len(rows)], "FP64")
        if module is httpclient:
            inp.set_data_from_numpy(arr, binary_data=binary)
        else:
            inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def check(labels: Any, probabilities: Any, pipe: Any, rows: Any) -> None:
    got = [v.decode() if isinstance(v, bytes) else v for v in np.asarray(labels).reshape(-1)]
    assert got == list(pipe.predict(rows))
    np.testing.assert_allclose(np.asarray(probabilities, dtype=np.float64).reshape(-1, 2), pipe.predict_proba(rows),
                               rtol=0, atol=1e-12)


def test_metadata_is_a_table_with_class_labels(served: tuple[ServeProcess, Any, Any]) -> None:
    proc, _, _ = served
    meta = httpx.get(f"{proc.url}/v2/models/churn").json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("age", "FP64", [-1]), ("income", "FP64", [-1]), ("score", "FP64", [-1]),
        ("city", "BYTES", [-1]), ("plan", "BYTES", [-1])]
    assert meta["parameters"]["content_type"] == "pd"
    assert meta["parameters"]["class_labels"] == ["churn", "stay"]
    assert [t["name"] for t in meta["outputs"]] == ["label", "probabilities"]


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_columns(served: tuple[ServeProcess, Any, Any], binary: bool) -> None:
    proc, pipe, rows = served
    client = httpclient.InferenceServerClient(proc.url.removeprefix("http://"))
    try:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
        result = client.infer("churn", columns(rows, httpclient, binary), outputs=outputs)
        check(result.as_numpy("label"), result.as_numpy("probabilities"), pipe, rows)
    finally:
        client.close()


def test_tritonclient_grpc_columns(served: tuple[ServeProcess, Any, Any]) -> None:
    proc, pipe, rows = served
    assert proc.grpc
    client = grpcclient.InferenceServerClient(proc.grpc)
    try:
        result = client.infer("churn", columns(rows, grpcclient))
        check(result.as_numpy("label"), result.as_numpy("probabilities"), pipe, rows)
    finally:
        client.close()


def test_plain_json_columns_and_records(served: tuple[ServeProcess, Any, Any]) -> None:
    proc, pipe, rows = served
    assert_table_answers(proc.url, "churn", pipe, rows)


def test_a_wrong_record_is_a_400(served: tuple[ServeProcess, Any, Any]) -> None:
    proc, _, _ = served
    body = {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [1], "data": ['{"age": "old"}']}]}
    r = httpx.post(f"{proc.url}/v2/models/churn/infer", json=body, timeout=60)
    assert r.status_code == 400 and "age" in r.json()["error"]
