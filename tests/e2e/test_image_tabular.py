"""The table pod in its built image, under Docker: 500 rows, row for row equal to ``pipeline.predict``.

The pipeline (tests/tables.py): a ColumnTransformer over numeric columns with missing values and
two string columns one-hot encoded, then a RandomForest. The image is built with the automatic lock
(pandas comes in because the adapter builds a DataFrame; nothing is added by hand), passes the
build-time load check, and runs read-only as documented.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tables import CATEGORICAL, assert_table_answers, save_table_model, table_frame

from modelpod.packing import pack
from modelpod.store import Store

# The first test builds the image in its fixture (sklearn, scipy and pandas unpacked, checked, compressed).
pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(1500)]
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def table_container(tmp_path_factory: pytest.TempPathFactory, base_image: Any, kit: Kit,
                    docker_engine: bool) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """The churn pipeline packed from its CSV sample, built, loaded and run; (REST URL, pipeline, build)."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")

    root = tmp_path_factory.mktemp("tabimg")
    d, pipe, _ = save_table_model(root / "m", "ignore")
    home = root / "home"
    kit.shared_wheels(home)
    rec = pack(d / "model.skops", "churn", Store(home), sample=d / "sample.csv",
               outputs=["label", "probabilities"])
    assert any(r.lower().startswith("pandas==") for r in rec.manifest.requirements)
    tag = f"modelpod-test/churn:{uuid.uuid4().hex[:12]}"
    built = kit.build_loaded(home, "churn:1", base_image.oci, root / "image.tar", tag)
    (root / "build.json").write_text(json.dumps(built))
    cid = ""
    try:
        cid = kit.docker("run", "-d", "--read-only", "-p", "127.0.0.1::8080", "--name",
                     f"modelpod-test-{uuid.uuid4().hex[:12]}", tag)
        url = f"http://127.0.0.1:{kit.published(cid, 8080)}"
        kit.wait_container(cid, lambda: kit.http_status(f"{url}/v2/models/churn/ready") == 200, 240,
                           "the table pod's image to be ready")
        yield url, pipe, built
    finally:
        if cid:
            kit.docker("rm", "-f", cid, check=False)
        kit.docker("rmi", tag, check=False)


def test_table_image_answers_like_the_pipeline_on_500_rows(table_container: tuple[str, Any, dict[str, Any]]) -> None:
    url, pipe, built = table_container
    assert built["load_check"] == "passed"
    rows = table_frame(500, seed=13, unseen=True)  # missing values and categories never seen in training
    assert rows.isna().any().any() and set(rows["city"]) - {"paris", "lyon", "nice", "lille"}
    assert_table_answers(url, "churn", pipe, rows)  # one input per column, then the records form


def test_table_image_tritonclient_binary_columns(table_container: tuple[str, Any, dict[str, Any]]) -> None:
    import tritonclient.http as httpclient

    url, pipe, _ = table_container
    rows = table_frame(500, seed=17, unseen=True)
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        inputs = []
        for name in rows.columns:
            if name in CATEGORICAL:
                inp = httpclient.InferInput(name, [len(rows)], "BYTES")
                inp.set_data_from_numpy(np.asarray(rows[name].tolist(), dtype=object), binary_data=True)
            else:
                inp = httpclient.InferInput(name, [len(rows)], "FP64")
                inp.set_data_from_numpy(rows[name].to_numpy(dtype=np.float64), binary_data=True)
            inputs.append(inp)
        result = client.infer("churn", inputs)
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").reshape(-1)]
        assert labels == list(pipe.predict(rows))
        np.testing.assert_allclose(result.as_numpy("probabilities").reshape(-1, 2), pipe.predict_proba(rows),
                                   rtol=0, atol=1e-12)
    finally:
        client.close()
