"""Shards take deterministic, disjoint shares; merge joins them in input order, checked complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from batchutil import cli, features, read_jsonl, write_parquet

from modelpod.batch import merge, run
from modelpod.batch.shards import parse_shard, share
from modelpod.batch.sources import Unit
from modelpod.errors import BatchError
from modelpod.store import Store


def _inputs(tmp_path: Path) -> tuple[Path, np.ndarray[Any, Any]]:
    d = tmp_path / "in"
    d.mkdir()
    chunks = [features(n, seed=s) for s, n in enumerate((900, 50, 1300, 400))]
    for i, x in enumerate(chunks):
        write_parquet(d / f"part-{i}.parquet", x, row_group_size=300)
    return d, np.concatenate(chunks)


def test_shares_are_disjoint_contiguous_and_cover_every_unit() -> None:
    units = [Unit(i, f"f{i // 3}", 0, 10, w) for i, w in enumerate([5, 100, 7, 7, 300, 1, 1, 1, 60, 40, 2])]
    for n in (1, 2, 3, 5, 11, 20):
        shares = [share(units, i, n) for i in range(n)]
        flat = [u.index for s in shares for u in s]
        assert flat == list(range(len(units)))  # each unit once, and in order when joined
        assert shares == [share(units, i, n) for i in range(n)]  # deterministic


def test_sharded_run_then_merge_equals_one_run(tmp_path: Path, home: Path, estimator: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src, x = _inputs(tmp_path)
    out = tmp_path / "scores.parquet"
    common = ["lr", "--input", str(src), "--output", str(out), "--keep-columns", "id", "--shards", "3"]
    for i in range(3):
        import modelpod.batch.cli as batch_cli

        # As a Kubernetes Indexed Job runs it: the index comes from JOB_COMPLETION_INDEX.
        env = {"JOB_COMPLETION_INDEX": str(i)}
        args = _parse(common)
        capsys.readouterr()
        assert batch_cli.batch_command(args, _settings(home), env=env) == 0
        assert not out.exists()
    rc, merged, err = cli(capsys, home, "merge", "--output", str(out))
    assert rc == 0, err
    assert merged["shards"] == 3 and merged["rows_out"] == len(x)
    table = pq.read_table(out)
    assert table["output-0"].to_pylist() == estimator.predict(x).tolist()
    assert not (tmp_path / "scores.parquet.shards").exists()


def test_merge_refuses_until_every_shard_is_done(tmp_path: Path, store: Store) -> None:
    src, _ = _inputs(tmp_path)
    out = tmp_path / "o.csv"
    s0 = run("lr", src, out, store=store, shard="0/3", keep_columns="id")
    s2 = run("lr", src, out, store=store, shard=(2, 3), keep_columns="id")
    assert s0.shard == "0/3" and s0.rows + s2.rows < 2650
    with pytest.raises(BatchError, match=r"1 of 3 shards are not finished \(1/3\)"):
        merge(out)
    assert not out.exists()
    run("lr", src, out, store=store, shard="1/3", keep_columns="id")
    shard_file = next((tmp_path / "o.csv.shards").glob("00001-of-00003.csv"))
    shard_file.write_bytes(shard_file.read_bytes() + b"1,1\n")
    with pytest.raises(BatchError, match="does not match its shard record"):
        merge(out)
    run("lr", src, out, store=store, shard="1/3", keep_columns="id", overwrite=True)
    summary = merge(out)
    assert summary.rows == 2650
    import pyarrow.csv as pcsv

    assert pcsv.read_csv(out)["id"].to_pylist() == [*range(900), *range(50), *range(1300), *range(400)]


def test_shard_errors_are_merged(tmp_path: Path, store: Store) -> None:
    import pyarrow as pa

    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        x = np.arange(10, dtype=np.float32) + 10 * i
        x[3] = -1
        pq.write_table(pa.table({"x": x}), d / f"{i}.parquet")
    out = tmp_path / "o.jsonl"
    for i in range(2):
        run("picky", d, out, store=store, shard=f"{i}/2")
    summary = merge(out, errors=tmp_path / "bad.jsonl")
    assert summary.errors == 4 and summary.rows_out == 36
    assert [Path(e["file"]).name for e in read_jsonl(tmp_path / "bad.jsonl")] == ["0.parquet", "1.parquet",
                                                                                  "2.parquet", "3.parquet"]


def test_shard_spec_errors() -> None:
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard(None, "3", 4) == (3, 4)
    assert parse_shard(None, None, None) is None
    for bad in ("4/4", "1-4", "x/2"):
        with pytest.raises(BatchError, match="shard"):
            parse_shard(bad)
    with pytest.raises(BatchError, match="JOB_COMPLETION_INDEX"):
        parse_shard(None, None, 4)


def _parse(args: list[str]) -> Any:
    from modelpod.cli import parser

    return parser().parse_args(["batch", *args, "--json"])


def _settings(home: Path) -> Any:
    from modelpod.settings import Settings

    return Settings.from_env({}, home=home)
