"""Killed at any moment, a job resumes from its last committed part: every row exactly once, in order."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from batchutil import features, write_parquet

from modelpod.batch import run
from modelpod.batch.parts import JOURNAL
from modelpod.errors import BatchError
from modelpod.store import Store


class Stop(Exception):
    """Raised from the progress callback: the job stops between parts, as a crash would leave it."""


def stop_after(parts: int) -> Any:
    seen = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "part":
            seen.append(event)
            if len(seen) >= parts:
                raise Stop

    return on_event


def _journal_lines(parts_dir: Path) -> int:
    try:
        return (parts_dir / JOURNAL).read_bytes().count(b"\n")
    except OSError:
        return 0


def test_kill_9_at_random_points_then_every_row_exactly_once(tmp_path: Path, home: Path) -> None:
    import modelpod

    direct = modelpod.load("linear", store=Store(home))
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    n = 40_000
    x = features(n, seed=7)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=4_000)
    out = tmp_path / "out.parquet"
    parts_dir = tmp_path / "out.parquet.parts"
    argv = [sys.executable, "-m", "modelpod", "--home", str(home), "batch", "linear", "--input", str(src),
            "--output", str(out), "--keep-columns", "id", "--part-rows", "500", "--batch-rows", "100", "--json"]
    kills: list[tuple[int, int]] = []
    summary: dict[str, Any] | None = None
    for attempt in range(30):
        start = _journal_lines(parts_dir)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if len(kills) < 6:
            target = start + rng.randint(1, 10)
            deadline = time.monotonic() + 120
            while proc.poll() is None and _journal_lines(parts_dir) < target and time.monotonic() < deadline:
                time.sleep(0.002)  # polling the journal, not waiting for a fixed time
            # A random extra moment, so the kill lands inside a part's write as well as between parts.
            end = time.monotonic() + rng.random() * 0.03
            while time.monotonic() < end and proc.poll() is None:
                pass
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=60)
                kills.append((attempt, _journal_lines(parts_dir)))
                assert not out.exists() or _journal_lines(parts_dir) == 0
                continue
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"seed {seed}: {stderr.decode()[-2000:]}"
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        break
    assert summary is not None, f"seed {seed}: the job never finished"
    assert len(kills) >= 5, f"seed {seed}: the job finished after only {len(kills)} kills ({kills})"
    assert summary["resumed_parts"] > 0 and summary["rows"] == n and summary["errors"] == 0
    table = pq.read_table(out)
    assert table["id"].to_pylist() == list(range(n)), f"seed {seed}"
    np.testing.assert_array_equal(table["output-0"].to_numpy(), direct(x)["output-0"], err_msg=f"seed {seed}")
    assert not parts_dir.exists()


def test_rerunning_the_same_call_resumes_and_reads_nothing_twice(tmp_path: Path, store: Store, estimator: Any
                                                                 ) -> None:
    x = features(3000)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=1000)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Stop):
        run("lr", src, out, store=store, part_rows=400, keep_columns="id", on_event=stop_after(4))
    assert not out.exists()
    events: list[dict[str, Any]] = []
    summary = run("lr", src, out, store=store, part_rows=400, keep_columns="id", on_event=events.append)
    # Row groups of 1000 rows in parts of at most 400: 400, 400, 200, 400 were committed.
    assert summary.resumed_parts == 4 and summary.resumed_rows == 1400
    assert events[0]["rows_done"] == 1400
    assert sum(e["rows"] for e in events if e["event"] == "part") == 1600
    got = [json.loads(line)["output-0"] for line in out.read_text().splitlines()]
    assert got == estimator.predict(x).tolist()


def test_torn_journal_line_and_damaged_part_are_redone(tmp_path: Path, store: Store, estimator: Any) -> None:
    x = features(2000)
    src = write_parquet(tmp_path / "in.parquet", x, row_group_size=500)
    out = tmp_path / "out.parquet"
    with pytest.raises(Stop):
        run("lr", src, out, store=store, part_rows=250, keep_columns="id", on_event=stop_after(5))
    parts_dir = tmp_path / "out.parquet.parts"
    first = sorted(parts_dir.glob("part-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    with (parts_dir / JOURNAL).open("ab") as fh:
        fh.write(b'{"unit": 3, "start": 0, "end"')  # a line cut off by the crash
    (parts_dir / "part-000003-0000000000.parquet").write_bytes(b"half a file")  # never committed
    summary = run("lr", src, out, store=store, part_rows=250, keep_columns="id")
    assert summary.resumed_parts == 4 and first.name in summary.dropped_parts
    assert pq.read_table(out)["output-0"].to_pylist() == estimator.predict(x).tolist()


def test_changed_input_is_refused(tmp_path: Path, store: Store) -> None:
    src = write_parquet(tmp_path / "in.parquet", features(1000), row_group_size=250)
    out = tmp_path / "out.parquet"
    with pytest.raises(Stop):
        run("lr", src, out, store=store, part_rows=100, keep_columns="id", on_event=stop_after(2))
    write_parquet(src, features(1000, seed=99), row_group_size=250)
    with pytest.raises(BatchError, match=f"input {src} changed since the first run.*--overwrite"):
        run("lr", src, out, store=store, part_rows=100, keep_columns="id")
    assert run("lr", src, out, store=store, keep_columns="id", overwrite=True).rows == 1000


def test_changed_pod_is_refused(tmp_path: Path) -> None:
    from modelpod.packing import pack

    store = Store(tmp_path / "home")
    code = tmp_path / "code"
    code.mkdir()
    model = ("from typing import Annotated\nimport numpy as np\nfrom modelpod import Model\n"
             "from modelpod.frameworks.python import Tensor\nF32 = Annotated[np.ndarray, Tensor('FP32', (-1,))]\n\n\n"
             "class Add(Model):\n    def predict(self, x: F32) -> F32:\n")
    (code / "model.py").write_text(model + "        return x + 1\n")
    rec = pack(code, "add", store)
    store.tag("add", rec.version, "prod")
    import pyarrow as pa

    pq.write_table(pa.table({"x": np.arange(500, dtype=np.float32)}), tmp_path / "in.parquet", row_group_size=100)
    out = tmp_path / "out.parquet"
    with pytest.raises(Stop):
        run("add@prod", tmp_path / "in.parquet", out, store=store, part_rows=50, on_event=stop_after(1))
    (code / "model.py").write_text(textwrap.dedent(model + "        return x + 2\n"))
    rec2 = pack(code, "add", store)
    store.tag("add", rec2.version, "prod")
    with pytest.raises(BatchError, match=r"the pod changed since the first run.*NAME:VERSION"):
        run("add@prod", tmp_path / "in.parquet", out, store=store, part_rows=50)
    run(f"add:{rec.version}", tmp_path / "in.parquet", out, store=store, part_rows=50)
    assert pq.read_table(out)["output-0"].to_pylist() == [v + 1.0 for v in range(500)]
