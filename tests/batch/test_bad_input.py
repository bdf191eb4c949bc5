"""Bad input: one clear message naming the file and the fix, exit 2, nothing under the output's name."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batchutil import cli, features, write_parquet


def _fails(capsys: pytest.CaptureFixture[str], home: Path, out: Path, *args: str) -> str:
    rc, _, err = cli(capsys, home, "lr", "--output", str(out), *args)
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()
    return err


def test_unreadable_file(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    err = _fails(capsys, home, tmp_path / "o.parquet", "--input", str(bad))
    assert str(bad) in err and "not a readable Parquet file" in err


def test_missing_input_and_missing_column(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(capsys, home, tmp_path / "o.parquet", "--input", str(tmp_path / "nope.parquet"))
    assert "no such file or directory" in err and "nope.parquet" in err
    src = write_parquet(tmp_path / "in.parquet", features(10))
    err = _fails(capsys, home, tmp_path / "o.parquet", "--input", str(src), "--columns", "f0,f1,zz")
    assert str(src) in err and "'zz'" in err and "--columns" in err


def test_schema_that_does_not_fit(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str],
                                  estimator: Any) -> None:
    x = features(30)
    src = tmp_path / "doubles.parquet"
    pq.write_table(pa.table({f"f{i}": x[:, i].astype(np.float64) for i in range(20)}), src)
    err = _fails(capsys, home, tmp_path / "o.parquet", "--input", str(src))
    assert str(src) in err and "is double" in err and "FP32" in err and "--cast" in err
    rc, summary, err = cli(capsys, home, "lr", "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                           "--cast")
    assert rc == 0, err
    assert pq.read_table(tmp_path / "o.parquet")["output-0"].to_pylist() == estimator.predict(x).tolist()
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({f"f{i}": [str(v) for v in x[:, i]] for i in range(20)}), text)
    err = _fails(capsys, home, tmp_path / "o2.parquet", "--input", str(text), "--cast")
    assert "is string" in err and str(text) in err


def test_existing_output_needs_overwrite(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_parquet(tmp_path / "in.parquet", features(10))
    out = tmp_path / "o.parquet"
    out.write_bytes(b"precious")
    rc, _, err = cli(capsys, home, "lr", "--input", str(src), "--output", str(out), "--keep-columns", "id")
    assert rc == 2 and str(out) in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    rc, _, err = cli(capsys, home, "lr", "--input", str(src), "--output", str(out), "--keep-columns", "id",
                     "--overwrite")
    assert rc == 0 and pq.read_table(out).num_rows == 10


def test_bad_output_names(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_parquet(tmp_path / "in.parquet", features(10))
    err = _fails(capsys, home, tmp_path / "o.xlsx", "--input", str(src), "--keep-columns", "id")
    assert "o.xlsx" in err and ".parquet, .csv or .jsonl" in err
    err = _fails(capsys, home, tmp_path / "no" / "dir" / "o.csv", "--input", str(src), "--keep-columns", "id")
    assert "does not exist" in err


@pytest.fixture
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A 256 KiB tmpfs when this process may mount one; else ENOSPC injected where parts are published."""
    where = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                              check=False)
        mounted = proc.returncode == 0
    if not mounted:
        import modelpod.batch.parts as parts
        import modelpod.batch.sinks as sinks

        real = parts.publish
        calls = {"n": 0}

        def full(tmp: Path, final: Path) -> tuple[str, int]:
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
            return real(tmp, final)

        monkeypatch.setattr(sinks, "publish", full)
    try:
        yield where, "tmpfs" if mounted else "injected"
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], check=False)


def test_disk_full(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], tiny_disk: tuple[Path, str],
                   estimator: Any) -> None:
    where, how = tiny_disk
    x = features(20_000)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=2000)
    out = where / "scores.jsonl"
    rc, _, err = cli(capsys, home, "lr", "--input", str(src), "--output", str(out), "--keep-columns", "id",
                     "--part-rows", "1000")
    assert rc == 2, err
    assert "no space left on the device" in err and str(where) in err and "rerun the same command" in err, how
    assert not out.exists()
    # Once there is room, the same command finishes the job from its committed parts.
    if how == "tmpfs":
        subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)
    else:
        pytest.MonkeyPatch().undo()
        import modelpod.batch.parts as parts
        import modelpod.batch.sinks as sinks

        sinks.publish = parts.publish  # type: ignore[attr-defined]
    rc, summary, err = cli(capsys, home, "lr", "--input", str(src), "--output", str(out), "--keep-columns", "id",
                           "--part-rows", "1000")
    assert rc == 0, err
    assert summary["resumed_parts"] > 0 and summary["rows_out"] == 20_000
    import json

    assert [json.loads(line)["output-0"] for line in out.read_text().splitlines()] == estimator.predict(x).tolist()


def test_integer_columns_are_not_floats(tmp_path: Path, home: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from modelpod.store import Store

    store = Store(home)
    src = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"x": pa.array([1, 2, 3], pa.int32())}), src)
    from modelpod.batch import run

    # picky takes FP-typed x: an int32 column is not a float one (no silent casts) ...
    with pytest.raises(Exception, match="is int32"):
        run("picky", src, tmp_path / "o.parquet", store=store)
    assert not (tmp_path / "o.parquet").exists()
    # ... while --cast converts the values that fit.
    assert run("picky", src, tmp_path / "o.parquet", store=store, cast=True).rows_out == 3
