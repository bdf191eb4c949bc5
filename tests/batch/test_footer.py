"""Parquet files joined at the file level: the same table as reading and concatenating them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from modelpod.batch import footer  # noqa: E402


def table(start: int, rows: int) -> object:
    rng = np.random.default_rng(start)
    return pa.table({
        "id": np.arange(start, start + rows),
        "score": rng.random(rows).astype(np.float32),
        "label": [f"c{i % 5}" for i in range(rows)],
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(rows * 3)), 3),
    })


def write(path: Path, start: int, rows: int, **kwargs: object) -> Path:
    pq.write_table(table(start, rows), path, **kwargs)
    return path


@pytest.mark.parametrize("checked", [True, False])  # hashed while copied through memory, or the kernel's copy
def test_joined_file_reads_as_the_files_in_order(tmp_path: Path, checked: bool) -> None:
    files = [write(tmp_path / "a.parquet", 0, 1000, row_group_size=300),
             write(tmp_path / "b.parquet", 1000, 10, write_page_index=True),
             write(tmp_path / "c.parquet", 1010, 700, row_group_size=700)]
    out = tmp_path / "out.parquet"
    sums = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    with out.open("wb") as fh:
        assert footer.join(files, fh, sums if checked else None)
    got = pq.read_table(out)
    assert got.equals(pa.concat_tables([pq.read_table(f) for f in files]))
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 1710 and meta.num_row_groups == 4 + 1 + 1
    assert pq.ParquetFile(out).read_row_group(5)["id"].to_pylist() == list(range(1010, 1710))


def test_footer_round_trips_byte_for_byte(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", 0, 100, row_group_size=30)
    meta, start = footer.read_footer(f)
    assert footer.encode(meta) == f.read_bytes()[start:-8]


def test_other_schemas_are_not_joined(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parquet", 0, 10)
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": np.arange(10, dtype=np.int32)}), b)
    out = tmp_path / "out.parquet"
    with out.open("wb") as fh:
        assert not footer.join([a, b], fh)
    assert out.stat().st_size == 0


def test_a_changed_file_is_refused_while_copied(tmp_path: Path) -> None:
    a = write(tmp_path / "a.parquet", 0, 10)
    b = write(tmp_path / "b.parquet", 10, 10)
    with (tmp_path / "out.parquet").open("wb") as fh, pytest.raises(footer.FooterError, match="checksum"):
        footer.join([a, b], fh, [hashlib.sha256(a.read_bytes()).hexdigest(), "0" * 64])


def test_not_parquet_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(footer.FooterError, match="not a plain Parquet file"):
        footer.read_footer(bad)
