"""Batch benchmark helpers that run inside the repository's venv (modelpod + pyarrow).

    python batch_tool.py data ROWS OUT.parquet          workload A's 20 features + id, row groups of 65,536
    python batch_tool.py inprocess HOME REF IN.parquet OUT.parquet
                                                        the pod's own predict on in-memory rows, per batch size

``inprocess`` prints JSON: rows/s at each batch size and the best one (the rows are read into memory
first, so this is the model alone: the ceiling a batch job is compared with); then, at the best
batch size, read + predict, and read + predict + write to OUT.parquet (a hand-written loop with no
resumability: the floor a file-to-file job should come close to).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

BATCH_SIZES = (1024, 4096, 16384, 65536)
FEATURES = 20


def data(rows: int, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(20261201)
    step = 1 << 20
    schema = pa.schema([("id", pa.int64()), *((f"f{i}", pa.float32()) for i in range(FEATURES))])
    with pq.ParquetWriter(out, schema) as writer:  # written in slices: a 10 M-row file never sits in memory
        for start in range(0, rows, step):
            n = min(step, rows - start)
            x = rng.normal(size=(n, FEATURES)).astype(np.float32)
            table = pa.table({"id": np.arange(start, start + n), **{f"f{i}": x[:, i] for i in range(FEATURES)}},
                             schema=schema)
            writer.write_table(table, row_group_size=1 << 16)


def inprocess(home: Path, ref: str, src: Path, out: Path) -> dict[str, object]:
    import pyarrow.parquet as pq

    import modelpod
    from modelpod.store import Store

    model = modelpod.load(ref, store=Store(home))
    table = pq.read_table(src, columns=[f"f{i}" for i in range(FEATURES)])
    x = np.stack([table.column(i).to_numpy() for i in range(FEATURES)], axis=1).astype(np.float32)
    name = model.signature.inputs[0].name
    model.predict({name: x[:1024]})  # warm
    results: dict[str, float] = {}
    for size in BATCH_SIZES:
        t0 = time.perf_counter()
        for start in range(0, len(x), size):
            model.predict({name: x[start:start + size]})
        results[str(size)] = len(x) / (time.perf_counter() - t0)
    best = max(results, key=lambda k: results[k])
    # A second ceiling: reading the file too (no writing), the least any file-to-file job must do.
    t0 = time.perf_counter()
    pf = pq.ParquetFile(src)
    for g in range(pf.metadata.num_row_groups):
        part = pf.read_row_group(g, columns=[f"f{i}" for i in range(FEATURES)])
        xs = np.stack([part.column(i).to_numpy() for i in range(FEATURES)], axis=1)
        for start in range(0, len(xs), int(best)):
            model.predict({name: xs[start:start + int(best)]})
    read_rate = len(x) / (time.perf_counter() - t0)
    return {"rows": len(x), "rows_per_s": results, "best_batch": int(best), "best_rows_per_s": results[best],
            "read_and_predict_rows_per_s": read_rate,
            "read_predict_write_rows_per_s": read_predict_write(model, src, int(best), out)}


def read_predict_write(model: object, src: Path, batch: int, out: Path) -> float:
    """The floor of a file job: read each row group, predict, write `id` and the outputs to one
    Parquet file with pyarrow's defaults (what a hand-written loop does), no resumability."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = model.signature.inputs[0].name  # type: ignore[attr-defined]
    columns = [f"f{i}" for i in range(FEATURES)]
    t0 = time.perf_counter()
    pf = pq.ParquetFile(src)
    writer = None
    rows = 0
    for g in range(pf.metadata.num_row_groups):
        part = pf.read_row_group(g, columns=["id", *columns])
        xs = np.stack([part.column(c).to_numpy() for c in columns], axis=1)
        for start in range(0, len(xs), batch):
            got = model.predict({name: xs[start:start + batch]})  # type: ignore[attr-defined]
            table = pa.table({"id": part.column("id").slice(start, batch),
                              **{k: pa.array(np.asarray(v).reshape(-1)) for k, v in got.items()}})
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            rows += table.num_rows
    if writer is not None:
        writer.close()
    return rows / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    if argv[:1] == ["data"]:
        data(int(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["inprocess"]:
        print(json.dumps(inprocess(Path(argv[1]), argv[2], Path(argv[3]), Path(argv[4]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
