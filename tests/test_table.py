"""Table signatures: DataFrame / CSV / Parquet / JSONL / .npz samples, str strings, exact predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tables import CATEGORICAL, column_request, records_request, save_table_model, table_frame

import modelpod
from modelpod import table
from modelpod.cli import main
from modelpod.errors import InvalidRequestError, SignatureError
from modelpod.protocols.codec import decode_request
from modelpod.store import Store

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module", params=["ignore", "error"])
def table_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, str]:
    """The pipeline saved with OneHotEncoder(handle_unknown=ignore) and with the default (error)."""
    d, pipe, _ = save_table_model(tmp_path_factory.mktemp("table") / "m", request.param)
    return d, pipe, request.param


def rows_for(handle_unknown: str, n: int = 500) -> Any:
    # Unknown categories only where the encoder ignores them; the default encoder refuses them.
    return table_frame(n, seed=7, unseen=handle_unknown == "ignore")


def decode(model: Any, body: dict[str, Any]) -> dict[str, np.ndarray]:
    """A request body decoded as the server decodes it for this model (its input check)."""
    return decode_request(body, None, table.input_check(model.signature, model.name)).inputs


def labels(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def test_dataframe_sample_gives_a_table_signature(store: Store, table_model: tuple[Path, Any, str]) -> None:
    d, pipe, unknown = table_model
    train = table_frame(400)
    rec = modelpod.pack(d / "model.skops", "churn", store=store, sample=train.head(20),
                        outputs=["label", "probabilities"])
    sig = rec.manifest.signature
    assert [(t.name, t.datatype, t.shape) for t in sig.inputs] == [
        ("age", "FP64", (-1,)), ("income", "FP64", (-1,)), ("score", "FP64", (-1,)),
        ("city", "BYTES", (-1,)), ("plan", "BYTES", (-1,))]
    assert sig.parameters["content_type"] == "pd"
    assert sig.parameters["dtypes"] == {c: str(train[c].dtype) for c in train.columns}
    assert sig.parameters["class_labels"] == ["churn", "stay"]
    assert [(t.name, t.datatype) for t in sig.outputs] == [("label", "BYTES"), ("probabilities", "FP64")]

    rows = rows_for(unknown)
    model = modelpod.load("churn", store=store)
    out = model(rows)
    assert labels(out["label"]) == list(pipe.predict(rows))  # all 500 rows, row for row
    np.testing.assert_array_equal(out["probabilities"], pipe.predict_proba(rows))
    # The same through the wire form: one OIP input per column, strings as BYTES.
    wire = decode(model, json.loads(json.dumps(column_request(rows))))
    assert labels(model(wire)["label"]) == list(pipe.predict(rows))


def test_strings_reach_the_model_as_str(store: Store, table_model: tuple[Path, Any, str]) -> None:
    d, _, _ = table_model
    modelpod.pack(d / "model.skops", "churn", store=store, sample=table_frame(30))
    model = modelpod.load("churn", store=store)
    seen: list[Any] = []
    inner = model.method  # type: ignore[attr-defined]
    model.method = lambda x: (seen.append(x), inner(x))[1]  # type: ignore[attr-defined]
    model(table_frame(5, seed=3))
    (frame,) = seen
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["age", "income", "score", *CATEGORICAL]
    assert all(type(v) is str for c in CATEGORICAL for v in frame[c])
    assert frame["age"].dtype == np.float64 and frame["age"].isna().sum() == table_frame(5, seed=3)["age"].isna().sum()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "npz"])
def test_sample_files_via_cli(tmp_path: Path, store: Store, fmt: str, capsys: pytest.CaptureFixture[str],
                              table_model: tuple[Path, Any, str]) -> None:
    d, pipe, unknown = table_model
    train = table_frame(60)
    sample = tmp_path / f"sample.{fmt}"
    if fmt == "csv":
        train.to_csv(sample, index=False)
    elif fmt == "parquet":
        train.to_parquet(sample)
    elif fmt == "jsonl":
        train.to_json(sample, orient="records", lines=True)
    else:
        np.savez(sample, **{c: train[c].to_numpy(dtype=str if c in CATEGORICAL else float) for c in train.columns})
    code = main(["--home", str(store.home), "pack", str(d / "model.skops"), "--name", "churn", "--sample",
                 str(sample), "--outputs", "label,probabilities", "--json"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    rec = store.get("churn")
    sig = rec.manifest.signature
    assert [(t.name, t.datatype) for t in sig.inputs] == [
        ("age", "FP64"), ("income", "FP64"), ("score", "FP64"), ("city", "BYTES"), ("plan", "BYTES")]
    rows = rows_for(unknown, 200)
    # predict --input takes the same table formats.
    given = tmp_path / f"rows.{'csv' if fmt == 'npz' else fmt}"
    if given.suffix == ".parquet":
        rows.to_parquet(given)
    elif given.suffix == ".jsonl":
        rows.to_json(given, orient="records", lines=True)
    else:
        rows.to_csv(given, index=False)
    assert main(["--home", str(store.home), "predict", "churn", "--input", str(given), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    got = {o["name"]: o for o in body["outputs"]}
    assert got["label"]["data"] == list(pipe.predict(rows))
    np.testing.assert_allclose(np.asarray(got["probabilities"]["data"]).reshape(-1, 2), pipe.predict_proba(rows))


def test_records_and_n_by_1_columns(store: Store, table_model: tuple[Path, Any, str]) -> None:
    d, pipe, unknown = table_model
    modelpod.pack(d / "model.skops", "churn", store=store, sample=table_frame(30))
    model = modelpod.load("churn", store=store)
    rows = rows_for(unknown, 120)
    want = list(pipe.predict(rows))
    records = decode(model, records_request(rows))
    assert labels(model(records)["output-0"]) == want
    # MLServer's pandas codec sends each column as [N, 1].
    req = column_request(rows)
    for t in req["inputs"]:
        t["shape"] = [len(rows), 1]
    assert labels(model(decode(model, req))["output-0"]) == want
    # One element holding a JSON array of records (handy with curl).
    one = {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [1],
                       "data": [json.dumps([json.loads(r) for r in records_request(rows)["inputs"][0]["data"]])]}]}
    assert labels(model(decode(model, one))["output-0"]) == want


def test_bad_records_are_request_errors(store: Store, table_model: tuple[Path, Any, str]) -> None:
    d, _, _ = table_model
    modelpod.pack(d / "model.skops", "churn", store=store, sample=table_frame(30))
    model = modelpod.load("churn", store=store)

    def records(*rows: Any) -> dict[str, Any]:
        return decode(model, {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [len(rows)],
                                          "data": [json.dumps(r) for r in rows]}]})

    ok = {"age": 30.0, "income": 1000.0, "score": 0.2, "city": "paris", "plan": "pro"}
    with pytest.raises(InvalidRequestError, match="unknown column.*colour"):
        model.coerce(records({**ok, "colour": "red"}))
    with pytest.raises(InvalidRequestError, match="'city'.*not a string"):
        model.coerce(records({**ok, "city": 3}))
    with pytest.raises(InvalidRequestError, match="'age'.*FP64"):
        model.coerce(records({**ok, "age": "old"}))
    with pytest.raises(InvalidRequestError, match="JSON object"):
        model.coerce(decode(model, {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [1],
                                                "data": ["not json"]}]}))


def test_unsupported_columns_are_named(store: Store, table_model: tuple[Path, Any, str]) -> None:
    d, _, _ = table_model
    frame = table_frame(10)
    frame["when"] = pd.to_datetime("2026-01-01")
    with pytest.raises(SignatureError, match="column 'when' has dtype datetime64"):
        modelpod.pack(d / "model.skops", "churn", store=store, sample=frame)
    mixed = table_frame(10)
    mixed["city"] = mixed["city"].astype(object)
    mixed.loc[0, "city"] = 5
    with pytest.raises(SignatureError, match="column 'city' mixes strings with int"):
        modelpod.pack(d / "model.skops", "churn", store=store, sample=mixed)


def test_only_the_trained_columns_in_the_trained_order(tmp_path: Path, store: Store,
                                                      table_model: tuple[Path, Any, str]) -> None:
    d, pipe, unknown = table_model
    sample = table_frame(40)
    sample.insert(0, "churned", "yes")  # a CSV often holds the target too
    sample = sample[["churned", "plan", "age", "city", "income", "score"]]
    sample.to_csv(tmp_path / "with_target.csv", index=False)
    rec = modelpod.pack(d / "model.skops", "churn", store=store, sample=tmp_path / "with_target.csv")
    sig = rec.manifest.signature
    assert [t.name for t in sig.inputs] == ["age", "income", "score", "city", "plan"]
    assert list(sig.parameters["dtypes"]) == ["age", "income", "score", "city", "plan"]
    rows = rows_for(unknown, 50)
    assert labels(modelpod.load("churn", store=store)(rows)["output-0"]) == list(pipe.predict(rows))
    with pytest.raises(SignatureError, match="lacks column.*score"):
        modelpod.pack(d / "model.skops", "churn", store=store, sample=table_frame(10).drop(columns="score"))


def test_every_column_type_round_trips_with_its_dtype() -> None:

    df = pd.DataFrame({
        "active": [True, False, True],
        "count": np.array([1, 2, 3], dtype=np.int64),
        "small": np.array([1, 2, 3], dtype=np.int32),
        "ratio": [0.5, np.nan, 1.5],
        "name": pd.Series(["a", "b", None], dtype=object),
        "tier": pd.Categorical(["gold", "silver", "gold"], categories=["silver", "gold", "bronze"]),
        "code": pd.Series(["x", "y", "z"], dtype="string"),
    })
    sig = table.frame_signature(df)
    assert [(t.name, t.datatype) for t in sig.inputs] == [
        ("active", "BOOL"), ("count", "INT64"), ("small", "INT32"), ("ratio", "FP64"), ("name", "BYTES"),
        ("tier", "BYTES"), ("code", "BYTES")]
    assert sig.parameters["categories"] == {"tier": ["silver", "gold", "bronze"]}
    batch = table.frame_batch(df, sig)
    assert batch["name"].tolist() == [b"a", b"b", None] and batch["tier"].tolist() == [b"gold", b"silver", b"gold"]
    back = table.to_frame(batch, sig)
    pd.testing.assert_frame_equal(back, df)


def test_without_pandas_the_hint_names_the_extra(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
                                                table_model: tuple[Path, Any, str]) -> None:
    import sys

    from modelpod.errors import MissingExtraError

    d, _, _ = table_model
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'modelpod\[tables\]'"):
        modelpod.pack(d / "model.skops", "churn", store=store, sample=d / "sample.csv")
    assert store.list() == []
