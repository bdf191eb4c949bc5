"""The pod's own image runs a batch job: `docker run IMAGE batch ...`, read-only, as its non-root user."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Building the image (pyarrow's wheel included) and starting a Python in a container per run is slow
# on a small shared machine: more than the suite's default per-test timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(1200)]


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def batch_image(sk_pod: Any, base_image: Any, kit: Any, tmp_path_factory: pytest.TempPathFactory,
                docker_engine: bool) -> Iterator[str]:
    """The sk-lr pod built with ``--with batch`` (pyarrow in the runtime layer) and loaded."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")
    from modelpod.cli import main

    archive = tmp_path_factory.mktemp("batch-archive") / "image.tar"
    tag = f"modelpod-test/sk-lr-batch:{uuid.uuid4().hex[:12]}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--home", str(sk_pod.home), "build", "sk-lr:1", "--base", base_image.oci, "--with", "batch",
                   "--output", f"docker-archive:{archive}", "--tag", tag, "--json"])
    assert rc == 0
    layers = json.loads(buf.getvalue())["layers"]
    assert any(layer["role"] == "runtime" for layer in layers)
    docker("load", "-i", str(archive))
    try:
        yield tag
    finally:
        docker("rmi", tag, check=False)


def _data(tmp_path: Path) -> tuple[Path, np.ndarray[Any, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # the container's user (65532) writes its output here
    x = np.random.default_rng(5).normal(size=(3000, 20)).astype(np.float32)
    for i, chunk in enumerate(np.array_split(x, 3)):
        start = sum(len(c) for c in np.array_split(x, 3)[:i])
        pq.write_table(pa.table({"id": np.arange(start, start + len(chunk)),
                                 **{f"f{j}": chunk[:, j] for j in range(20)}}), data / f"in-{i}.parquet")
    return data, x


def _run(tag: str, data: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    flags = [f for k, v in (env or {}).items() for f in ("-e", f"{k}={v}")]
    return docker("run", "--rm", "--read-only", "--user", "65532", "--network", "none", "-v", f"{data}:/data",
                  *flags, tag, *args, check=False)


def test_image_scores_files(batch_image: str, tmp_path: Path, sk_pod: Any) -> None:
    import pyarrow.parquet as pq

    import modelpod

    data, x = _data(tmp_path)
    want = modelpod.load("sk-lr:1", store=sk_pod.store)(x)["output-0"].tolist()
    proc = _run(batch_image, data, "batch", "--input", "/data/in-*.parquet", "--output", "/data/out.parquet",
                "--keep-columns", "id", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_out"] == 3000 and summary["inputs"] == 3
    assert any(json.loads(line)["event"] == "part" for line in proc.stderr.splitlines() if line.startswith("{"))
    table = pq.read_table(data / "out.parquet")
    assert table["id"].to_pylist() == list(range(3000)) and table["output-0"].to_pylist() == want


def test_image_runs_shards_then_merges_them(batch_image: str, tmp_path: Path, sk_pod: Any) -> None:
    import modelpod

    data, x = _data(tmp_path)
    want = modelpod.load("sk-lr:1", store=sk_pod.store)(x)["output-0"].tolist()
    # As a Kubernetes Indexed Job runs it: two shards by JOB_COMPLETION_INDEX, then the merge.
    for index in range(2):
        proc = _run(batch_image, data, "batch", "--input", "/data/in-*.parquet", "--output", "/data/sharded.csv",
                    "--keep-columns", "id", "--shards", "2", env={"JOB_COMPLETION_INDEX": str(index)})
        assert proc.returncode == 0, proc.stderr
    proc = _run(batch_image, data, "batch", "merge", "--output", "/data/sharded.csv")
    assert proc.returncode == 0, proc.stderr
    import pyarrow.csv as pcsv

    merged = pcsv.read_csv(data / "sharded.csv")
    assert merged["id"].to_pylist() == list(range(3000)) and merged["output-0"].to_pylist() == want
    # Bad input inside the image: the same one-line message and exit 2.
    proc = _run(batch_image, data, "batch", "--input", "/data/missing.parquet", "--output", "/data/x.parquet")
    assert proc.returncode == 2 and "missing.parquet" in proc.stderr and "Traceback" not in proc.stderr
