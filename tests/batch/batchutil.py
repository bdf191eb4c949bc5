"""Helpers the batch tests share (test modules import this; fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def features(n: int, seed: int = 1) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).normal(size=(n, 20)).astype(np.float32)


def write_parquet(path: Path, x: np.ndarray[Any, Any], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": np.arange(len(x)), **{f"f{i}": x[:, i] for i in range(x.shape[1])}})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, Any, str]:
    """``modelpod --home HOME batch ARGS --json`` in-process: (exit code, parsed summary or None, stderr)."""
    from modelpod.cli import main

    capsys.readouterr()
    rc = main(["--home", str(home), "batch", *args, "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 and out.strip() else None), err
