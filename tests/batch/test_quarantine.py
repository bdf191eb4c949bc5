"""Bad rows go to the errors file with their row and reason; the rest of the batch is scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batchutil import cli, features, read_jsonl

from modelpod.batch import run
from modelpod.errors import TooManyErrorsError
from modelpod.store import Store


def _csv(path: Path, x: np.ndarray[Any, Any], bad: dict[int, tuple[int, str]]) -> list[list[str]]:
    rows = [[f"{v!r}" for v in map(float, r)] for r in x]
    for i, (col, text) in bad.items():
        rows[i][col] = text
    header = ",".join(f"f{i}" for i in range(x.shape[1]))
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return rows


def test_csv_values_that_do_not_parse_are_quarantined(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(200)
    bad = {3: (0, "abc"), 77: (5, ""), 150: (19, "1e999")}
    _csv(tmp_path / "in.csv", x, bad)
    summary = run("lr", tmp_path / "in.csv", tmp_path / "out.parquet", store=store,
                  errors=tmp_path / "bad.jsonl")
    assert (summary.rows, summary.rows_out, summary.errors) == (200, 197, 3)
    errors = read_jsonl(tmp_path / "bad.jsonl")
    assert [e["row"] for e in errors] == [3, 77, 150]
    assert all(e["file"] == str(tmp_path / "in.csv") for e in errors)
    assert "'abc' is not FP32" in errors[0]["reason"] and errors[0]["values"]["f0"] == "abc"
    assert "f5" in errors[1]["reason"] and "empty" in errors[1]["reason"]
    keep = [i for i in range(200) if i not in bad]
    got = pq.read_table(tmp_path / "out.parquet")["output-0"].to_pylist()
    assert got == estimator.predict(x[keep]).tolist()


def test_jsonl_lines_that_are_not_json_and_values_of_the_wrong_kind(tmp_path: Path, store: Store) -> None:
    lines = ['{"age": 1, "city": "a"}', "{not json", '{"age": "old", "city": "b"}', '{"city": "c"}',
             '{"age": 2, "city": 7}', '{"age": 3, "city": "dd"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    summary = run("named", tmp_path / "in.jsonl", tmp_path / "out.jsonl", store=store)
    assert (summary.rows_out, summary.errors) == (2, 4)
    errors = read_jsonl(Path(summary.errors_path or ""))
    assert [e["row"] for e in errors] == [1, 2, 3, 4]
    assert "not a JSON object" in errors[0]["reason"]
    assert "'age'" in errors[1]["reason"] and "missing" in errors[2]["reason"]
    assert "BYTES elements must be strings" in errors[3]["reason"]  # the server's own rule
    assert [r["output-0"] for r in read_jsonl(tmp_path / "out.jsonl")] == [3.0, 8.0]


def test_a_failed_batch_is_retried_row_by_row(tmp_path: Path, store: Store) -> None:
    x = np.arange(40, dtype=np.float32)
    x[[5, 21]] = -1.0
    pq.write_table(pa.table({"x": x}), tmp_path / "in.parquet")
    summary = run("picky", tmp_path / "in.parquet", tmp_path / "out.parquet", store=store, batch_rows=16)
    assert (summary.rows_out, summary.errors) == (38, 2)
    errors = read_jsonl(Path(summary.errors_path or ""))
    assert [e["row"] for e in errors] == [5, 21]
    assert all("negative values are not allowed" in e["reason"] for e in errors)
    got = pq.read_table(tmp_path / "out.parquet")["output-0"].to_pylist()
    assert got == [v + 1.0 for i, v in enumerate(x.tolist()) if i not in (5, 21)]


def test_null_cells_and_short_lists_are_bad_rows(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(6)
    values: list[Any] = [list(r) for r in x]
    values[1] = None
    values[4] = list(x[4][:19])
    pq.write_table(pa.table({"input-0": pa.array(values, pa.list_(pa.float32()))}), tmp_path / "in.parquet")
    summary = run("lr", tmp_path / "in.parquet", tmp_path / "out.parquet", store=store)
    errors = read_jsonl(Path(summary.errors_path or ""))
    assert [(e["row"], "null" in e["reason"] or "holds 19 values" in e["reason"]) for e in errors] == [
        (1, True), (4, True)]
    got = pq.read_table(tmp_path / "out.parquet")["output-0"].to_pylist()
    assert got == estimator.predict(x[[0, 2, 3, 5]]).tolist()


def test_max_errors_fails_the_run_and_a_higher_limit_carries_on(tmp_path: Path, home: Path, estimator: Any,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    x = features(120)
    _csv(tmp_path / "in.csv", x, {i: (0, "x") for i in range(0, 120, 10)})  # 12 bad rows
    args = ["lr", "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv"), "--part-rows", "30"]
    rc, _, err = cli(capsys, home, *args, "--max-errors", "5")
    assert rc == 1 and "more than --max-errors 5" in err
    assert not (tmp_path / "out.csv").exists()
    rc, summary, err = cli(capsys, home, *args, "--max-errors", "12")
    assert rc == 0, err
    assert summary["resumed_parts"] >= 1 and summary["errors"] == 12 and summary["rows_out"] == 108
    with pytest.raises(TooManyErrorsError):
        run("lr", tmp_path / "in.csv", tmp_path / "again.csv", store=Store(home), max_errors=0)


def test_csv_rows_with_the_wrong_number_of_fields(tmp_path: Path, store: Store) -> None:
    (tmp_path / "in.csv").write_text("x\n1\n2,3\n4\n")
    summary = run("picky", tmp_path / "in.csv", tmp_path / "out.jsonl", store=store, columns="x")
    assert summary.rows_out == 2 and summary.errors == 1
    (error,) = read_jsonl(Path(summary.errors_path or ""))
    assert error["line"] == 3 and "expected 1 fields, found 2" in error["reason"]
    assert [r["output-0"] for r in read_jsonl(tmp_path / "out.jsonl")] == [2.0, 5.0]
    assert json.dumps(error)  # one JSON object per line
