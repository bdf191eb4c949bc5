"""A tabular model for tests (tests/ is on sys.path): a ColumnTransformer pipeline over a DataFrame.

Three numeric columns with missing values (imputed, scaled), two categorical string columns
(one-hot encoded), then a RandomForest. ``table_frame`` makes the synthetic data (``unseen`` adds
categories the model never saw, to exercise ``handle_unknown``); ``save_table_model`` writes the
skops file and a CSV sample; ``assert_table_answers`` checks any server (a process, an image) that
serves the pod packed with ``--outputs label,probabilities``, row for row against the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

NUMERIC = ("age", "income", "score")
CATEGORICAL = ("city", "plan")
CITIES = ("paris", "lyon", "nice", "lille")
PLANS = ("basic", "pro", "team")


def table_frame(rows: int, seed: int = 0, unseen: bool = False) -> Any:
    """Synthetic rows: numeric columns with NaNs, string columns; ``unseen`` adds unknown categories."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    age = rng.normal(40, 12, rows).round(1)
    income = rng.lognormal(10, 0.5, rows).round(2)
    score = rng.uniform(0, 1, rows)
    for col in (age, income, score):
        col[rng.random(rows) < 0.1] = np.nan
    cities = list(CITIES) + (["marseille", "brest"] if unseen else [])
    plans = list(PLANS) + (["enterprise"] if unseen else [])
    return pd.DataFrame({
        "age": age, "income": income, "score": score,
        "city": rng.choice(cities, rows).astype(object), "plan": rng.choice(plans, rows).astype(object),
    })


def table_labels(df: Any) -> np.ndarray[Any, Any]:
    """String labels that depend on every column (so a wrong encoding shows)."""
    city_bonus = df["city"].map({"paris": 1.0, "lyon": -0.5, "nice": 0.3}).fillna(0.0)
    plan_bonus = df["plan"].map({"pro": 0.8, "team": -0.8}).fillna(0.0)
    z = (df["age"].fillna(40) - 40) / 12 + np.log(df["income"].fillna(22000)) - 10 + city_bonus + plan_bonus
    return np.where(z + df["score"].fillna(0.5) > 0.7, "churn", "stay").astype(object)


def table_pipeline(handle_unknown: str = "ignore", seed: int = 0) -> tuple[Any, Any]:
    """(fitted pipeline, training frame). ``handle_unknown``: "ignore", or "error" (the default)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    df = table_frame(400, seed)
    encoder = OneHotEncoder(handle_unknown=handle_unknown) if handle_unknown != "error" else OneHotEncoder()
    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), list(NUMERIC)),
        ("cat", encoder, list(CATEGORICAL)),
    ])
    pipe = Pipeline([("pre", pre), ("rf", RandomForestClassifier(n_estimators=25, max_depth=6, random_state=seed))])
    pipe.fit(df, table_labels(df))
    return pipe, df


def save_table_model(directory: Path, handle_unknown: str = "ignore") -> tuple[Path, Any, Any]:
    """The pipeline saved as model.skops plus its training data as sample.csv; (dir, pipeline, frame)."""
    import skops.io as sio

    pipe, df = table_pipeline(handle_unknown)
    directory.mkdir(parents=True, exist_ok=True)
    sio.dump(pipe, directory / "model.skops")
    df.head(50).to_csv(directory / "sample.csv", index=False)
    return directory, pipe, df


def column_request(df: Any) -> dict[str, Any]:
    """An OIP v2 request with one input per column (NaN sent as JSON null)."""
    inputs = []
    for name in df.columns:
        values = df[name].tolist()
        if name in CATEGORICAL:
            inputs.append({"name": name, "datatype": "BYTES", "shape": [len(df)], "data": values})
        else:
            data = [None if v != v else v for v in values]
            inputs.append({"name": name, "datatype": "FP64", "shape": [len(df)], "data": data})
    return {"inputs": inputs}


def records_request(df: Any) -> dict[str, Any]:
    """The convenience form: one BYTES input ``records``, one JSON object per row."""
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in df.to_dict(orient="records")]
    return {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [len(rows)],
                        "data": [json.dumps(r) for r in rows]}]}


def assert_table_answers(url: str, model: str, pipe: Any, rows: Any, headers: dict[str, str] | None = None) -> None:
    """POST the rows to ``url`` (columns, then records) and compare with ``pipe``, row for row."""
    import httpx

    want = list(pipe.predict(rows))
    proba = pipe.predict_proba(rows)
    for body in (column_request(rows), records_request(rows)):
        r = httpx.post(f"{url}/v2/models/{model}/infer", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["label"]["data"] == want
        got = np.asarray(out["probabilities"]["data"], dtype=np.float64).reshape(proba.shape)
        np.testing.assert_allclose(got, proba, rtol=0, atol=1e-12)
