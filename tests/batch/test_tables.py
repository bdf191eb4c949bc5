"""Table pods (one input per column, as h/tabular's table signatures give them) score files by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from modelpod.batch import run
from modelpod.store import Store

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def table_pod(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Any, Any]:
    import skops.io as sio
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    from modelpod.packing import pack

    rng = np.random.default_rng(3)
    n = 200
    frame = pd.DataFrame({"tenure": rng.integers(0, 60, n).astype(float), "spend": rng.gamma(2.0, 30.0, n),
                          "region": rng.choice(["north", "south", "east"], n).astype(object)})
    frame.loc[rng.random(n) < 0.15, "spend"] = np.nan  # gaps the model handles
    y = np.where(frame["tenure"] < 20, "churn", "stay")
    model = Pipeline([("c", ColumnTransformer([("r", OneHotEncoder(handle_unknown="ignore"), ["region"])],
                                              remainder="passthrough")),
                      ("m", HistGradientBoostingClassifier(max_iter=20))]).fit(frame, y)
    d = tmp_path_factory.mktemp("table")
    sio.dump(model, d / "model.skops")
    frame.to_csv(d / "train.csv", index=False)
    store = Store(d / "home")
    rec = pack(d / "model.skops", "churn", store, sample=d / "train.csv", allow_pickle=True)
    assert rec.manifest.signature.is_table
    return store, model, frame


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_table_pod_scores_columns_by_name_with_gaps_as_nan(tmp_path: Path, table_pod: tuple[Store, Any, Any],
                                                           suffix: str) -> None:
    store, model, frame = table_pod
    src = tmp_path / f"in.{suffix}"
    shuffled = frame[["region", "spend", "tenure"]].assign(id=range(len(frame)))  # another column order, an id
    if suffix == "csv":
        shuffled.to_csv(src, index=False)
    elif suffix == "parquet":
        shuffled.to_parquet(src)
    else:
        src.write_text("".join(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v)
                                           for k, v in row.items()}) + "\n" for row in shuffled.to_dict("records")))
    summary = run("churn", src, tmp_path / "out.parquet", store=store, keep_columns="id")
    assert summary.errors == 0 and summary.rows_out == len(frame)
    out = pq.read_table(tmp_path / "out.parquet")
    ids = list(range(len(frame)))
    assert out["id"].to_pylist() == ([str(i) for i in ids] if suffix == "csv" else ids)  # CSV keeps its text
    assert out.column_names[0] == "id" and len(out.column_names) == 2
    assert out.column(1).to_pylist() == model.predict(frame).tolist()
    assert not list(tmp_path.glob("*.errors.jsonl"))
