"""Every input format and every output format, checked row by row against a direct prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from batchutil import cli, features, read_jsonl, write_parquet

from modelpod.batch import run
from modelpod.store import Store


def test_parquet_to_parquet_keeps_columns_in_input_order(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(5000)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=700)
    summary = run("lr@production", src, tmp_path / "out.parquet", store=store, keep_columns="id", batch_rows=256,
                  part_rows=1000)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["id", "output-0"]
    assert out["id"].to_pylist() == list(range(5000))
    assert out["output-0"].to_pylist() == estimator.predict(x).tolist()
    assert (summary.rows, summary.rows_out, summary.errors, summary.inputs) == (5000, 5000, 0, 1)
    assert summary.digest.startswith("sha256:") and summary.parts >= 8  # 8 row groups, parts within each
    assert not (tmp_path / "out.parquet.parts").exists()  # parts are gone once the output is whole


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_csv_and_jsonl_outputs(tmp_path: Path, store: Store, estimator: Any, suffix: str) -> None:
    x = features(300)
    src = write_parquet(tmp_path / "in.parquet", x)
    out = tmp_path / f"out.{suffix}"
    run("lr", src, out, store=store, keep_columns=["id"])
    if suffix == "csv":
        table = pcsv.read_csv(out)
        rows = table.to_pylist()
    else:
        rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(range(300))
    assert [r["output-0"] for r in rows] == estimator.predict(x).tolist()


def test_csv_input_parsed_as_the_signature_datatypes(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(400)
    src = tmp_path / "in.csv"
    cols = {"key": [f"k{i}" for i in range(400)], **{f"f{i}": x[:, i] for i in range(20)}}
    pcsv.write_csv(pa.table(cols), src)
    run("lr", src, tmp_path / "out.parquet", store=store, keep_columns="key", columns=",".join(f"f{i}" for i in
                                                                                              range(20)))
    out = pq.read_table(tmp_path / "out.parquet")
    assert out["key"].to_pylist() == cols["key"]
    # CSV text of a float32 parsed back as FP32 is the same number: predictions match the in-memory ones.
    assert out["output-0"].to_pylist() == estimator.predict(x).tolist()


def test_jsonl_input_with_named_inputs(tmp_path: Path, store: Store) -> None:
    src = tmp_path / "people.jsonl"
    rows = [{"id": i, "age": 20 + i, "city": ["Oslo", "Lima", "Rome"][i % 3]} for i in range(50)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("named", src, tmp_path / "out.jsonl", store=store, keep_columns="id")
    got = read_jsonl(tmp_path / "out.jsonl")
    assert [g["id"] for g in got] == list(range(50))
    assert [g["output-0"] for g in got] == [pytest.approx(r["age"] * 2.0 + len(r["city"])) for r in rows]


def test_named_inputs_from_parquet_and_input_map(tmp_path: Path, store: Store) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"years": pa.array([1.5, 2.5], pa.float32()), "town": ["ab", "abc"]}), src)
    run("named", src, tmp_path / "out.parquet", store=store, input_map={"age": ["years"], "city": ["town"]})
    assert pq.read_table(tmp_path / "out.parquet")["output-0"].to_pylist() == [5.0, 8.0]


def test_list_column_feeds_a_tensor_input(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(64)
    src = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"input-0": pa.array(list(x), pa.list_(pa.float32()))}), src)
    run("lr", src, tmp_path / "out.parquet", store=store)
    assert pq.read_table(tmp_path / "out.parquet")["output-0"].to_pylist() == estimator.predict(x).tolist()


def test_npy_files_glob(tmp_path: Path, store: Store, estimator: Any) -> None:
    a, b = features(100, seed=2), features(37, seed=3)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    summary = run("lr", str(tmp_path / "*.npy"), tmp_path / "out.parquet", store=store, batch_rows=16)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out["output-0"].to_pylist() == estimator.predict(np.concatenate([a, b])).tolist()
    assert summary.inputs == 2


def test_image_folder_feeds_raw_bytes(tmp_path: Path, store: Store) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    blobs = {}
    for i in range(7):
        rel = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        data = bytes([i + 1]) * (10 + i)
        (folder / rel).write_bytes(data)
        blobs[rel] = data
    run("sizes", folder, tmp_path / "out.parquet", store=store)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["path"] for r in out] == sorted(blobs)
    assert {r["path"]: r["output-0"] for r in out} == {k: len(v) + v[0] for k, v in blobs.items()}


def test_cli_runs_and_reports_one_status_line_per_part(tmp_path: Path, home: Path, estimator: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    x = features(3000)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=1000)
    rc, summary, err = cli(capsys, home, "lr:1", "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                           "--keep-columns", "id", "--part-rows", "500")
    assert rc == 0, err
    events = [json.loads(line) for line in err.splitlines()]
    parts = [e for e in events if e["event"] == "part"]
    assert events[0]["event"] == "start" and events[0]["rows_total"] == 3000
    assert len(parts) == summary["parts"] == 6
    assert parts[-1]["rows_done"] == 3000 and all("rows_per_s" in p and "eta_s" in p for p in parts)
    assert summary["rows_out"] == 3000
    assert pq.read_table(tmp_path / "o.parquet")["output-0"].to_pylist() == estimator.predict(x).tolist()


def test_workers_keep_input_order(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(4000)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=500)
    run("lr", src, tmp_path / "out.parquet", store=store, keep_columns="id", workers=3, part_rows=300)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out["id"].to_pylist() == list(range(4000))
    assert out["output-0"].to_pylist() == estimator.predict(x).tolist()


def test_a_terminal_gets_a_progress_bar(tmp_path: Path, home: Path) -> None:
    import os
    import subprocess
    import sys

    src = write_parquet(tmp_path / "in.parquet", features(3000), row_group_size=1000)
    leader, follower = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "modelpod", "--home", str(home), "batch", "linear", "--input",
                               str(src), "--output", str(tmp_path / "o.csv"), "--keep-columns", "id"],
                              stdout=subprocess.PIPE, stderr=follower, timeout=120, check=False,
                              env={**os.environ, "COLUMNS": "120"})
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    text = shown.decode("utf-8", "replace")
    assert "3000/3000" in text and "rows/s" in text and '"event"' not in text
    assert proc.stdout.decode().startswith("wrote 3000 rows to ")


def test_jsonl_features_fill_a_single_tensor_input(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(40)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, **{f"f{j}": float(v) for j, v in enumerate(r)}}) + "\n"
                           for i, r in enumerate(x)))
    run("lr", src, tmp_path / "out.csv", store=store, keep_columns="id")
    assert pcsv.read_csv(tmp_path / "out.csv")["output-0"].to_pylist() == estimator.predict(x).tolist()


def test_list_columns_kept_in_csv_become_json_text(tmp_path: Path, store: Store) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": pa.array([1.0, 2.0], pa.float32()), "tags": [["a", "b"], []]}), src)
    run("picky", src, tmp_path / "out.csv", store=store, keep_columns="tags")
    rows = pcsv.read_csv(tmp_path / "out.csv").to_pylist()
    assert rows == [{"tags": '["a","b"]', "output-0": 2.0}, {"tags": "[]", "output-0": 3.0}]


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_several_outputs_and_tensor_outputs(tmp_path: Path, store: Store, suffix: str) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": pa.array([1.5, -2.0], pa.float32())}), src)
    out = tmp_path / f"out.{suffix}"
    run("multi", src, out, store=store)
    if suffix == "parquet":
        rows = pq.read_table(out).to_pylist()
        assert rows == [{"label": "pos", "scores": [1.5, -1.5]}, {"label": "neg", "scores": [-2.0, 2.0]}]
    elif suffix == "csv":
        rows = pcsv.read_csv(out).to_pylist()
        assert rows == [{"label": "pos", "scores_0": 1.5, "scores_1": -1.5},
                        {"label": "neg", "scores_0": -2.0, "scores_1": 2.0}]
    else:
        assert read_jsonl(out) == [{"label": "pos", "scores": [1.5, -1.5]}, {"label": "neg", "scores": [-2.0, 2.0]}]


def test_default_batch_rows_follow_the_row_width(tmp_path: Path, store: Store) -> None:
    """20 FP32 features (80 bytes a row): 65,536 rows a call (8 MiB at most); text inputs: 1,024."""
    events: list[dict[str, Any]] = []
    src = write_parquet(tmp_path / "in.parquet", features(100))
    run("lr", src, tmp_path / "out.parquet", store=store, keep_columns="id", on_event=events.append)
    assert events[0]["batch_rows"] == 65536
    import pyarrow as pa

    pq.write_table(pa.table({"age": np.ones(10, np.float32), "city": ["a"] * 10}), tmp_path / "named.parquet")
    events.clear()
    run("named", tmp_path / "named.parquet", tmp_path / "named-out.parquet", store=store, on_event=events.append)
    assert events[0]["batch_rows"] == 1024
