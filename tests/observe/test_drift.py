"""Drift: reference distributions packed into the pod, live histograms, PSI metrics, the JSON endpoint
and ``modelpod drift URL MODEL``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import PYTHON, REPO, LiveServer, metric_value

from modelpod.api import pack
from modelpod.errors import UsageError
from modelpod.observe.drift import MIN_ROWS, REFERENCE_NAME, DriftMonitor, build_reference, psi, read_reference
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import Store

RNG = np.random.default_rng(7)
REFERENCE = RNG.normal(size=(3000, 20)).astype(np.float32)


@pytest.fixture(scope="module")
def drift_home(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, object]) -> Path:
    path, sample, _ = sklearn_model
    home = tmp_path_factory.mktemp("drift")
    ref = home / "reference.npy"
    np.save(ref, REFERENCE)
    pack(path, "scorer", store=Store(home), sample=sample, reference=ref)
    return home


def test_reference_bins_numeric_and_text_features() -> None:
    ref = build_reference({"x": REFERENCE[:, :2], "city": np.array(["a", "b", "a", "c"] * 50, dtype=object),
                           "image": np.zeros((4, 3, 8, 8))})
    assert ref is not None and ref["rows"] == 3000
    feats = {f["feature"]: f for f in ref["features"]}
    assert set(feats) == {"x[0]", "x[1]", "city"}  # 4-D tensors have no features
    assert len(feats["x[0]"]["edges"]) == 9 and abs(sum(feats["x[0]"]["reference"]) - 1) < 1e-6
    assert all(abs(s - 0.1) < 0.01 for s in feats["x[0]"]["reference"])  # quantile bins: a tenth each
    assert feats["city"]["values"] == ["a", "b", "c"] and feats["city"]["reference"][0] == 0.5


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    ref = build_reference({"x": REFERENCE})
    assert ref is not None
    same = DriftMonitor(ref, "m", "1", "m:1")
    shifted = DriftMonitor(ref, "m", "1", "m:1")
    for _ in range(5):
        same.observe({"x": RNG.normal(size=(200, 20)).astype(np.float32)})
        live = RNG.normal(size=(200, 20)).astype(np.float32)
        live[:, 3] += 2.0
        shifted.observe({"x": live})
    assert (same.score() or 1) < 0.1
    scores = dict(shifted.scores())
    assert scores["x[3]"] > 0.25 and max(v for k, v in scores.items() if k != "x[3]") < 0.1
    assert shifted.table()["status"] == "drift" and same.table()["status"] == "ok"
    assert psi(np.array([10.0, 10.0]), np.array([0.5, 0.5])) == pytest.approx(0.0)


def test_warming_up_until_enough_rows() -> None:
    ref = build_reference({"x": REFERENCE})
    assert ref is not None
    monitor = DriftMonitor(ref, "m", "1", "m:1")
    monitor.observe({"x": REFERENCE[:10]})
    assert monitor.score() is None and monitor.table()["status"] == "warming up"


def test_pack_keeps_the_reference_in_the_pod(drift_home: Path, sklearn_model: tuple[Path, Any, Any],
                                             tmp_path: Path) -> None:
    rec = Store(drift_home).get("scorer")
    files = {f.path: f for f in rec.manifest.files}
    assert files[REFERENCE_NAME].role == "config"
    ref = read_reference(Store(drift_home).open(rec.ref).path)
    assert ref is not None and ref["rows"] == 3000 and len(ref["features"]) == 20
    # Without --reference, the sample gives it; a reference with none of the model's inputs is refused.
    path, sample, _ = sklearn_model
    store = Store(tmp_path / "h")
    plain = pack(path, "plain", store=store, sample=sample)
    assert read_reference(store.open(plain.ref).path)["rows"] == len(sample)  # type: ignore[index]
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros((5, 3)))
    with pytest.raises(UsageError, match="--reference"):
        pack(path, "bad", store=store, sample=sample, reference=bad)


def test_cli_pack_reference_flag(sklearn_model: tuple[Path, Any, Any], tmp_path: Path) -> None:
    path, sample, _ = sklearn_model
    np.save(tmp_path / "s.npy", sample)
    np.save(tmp_path / "r.npy", REFERENCE[:500])
    proc = subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(tmp_path / "h"), "pack", str(path),
                           "--name", "p", "--sample", str(tmp_path / "s.npy"), "--reference", str(tmp_path / "r.npy"),
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    store = Store(tmp_path / "h")
    assert read_reference(store.open(store.get("p").ref).path)["rows"] == 500  # type: ignore[index]


@pytest.fixture(scope="module")
def live(drift_home: Path) -> Iterator[LiveServer]:
    def setup(engine: InferenceEngine) -> None:
        engine.add("scorer")

    with LiveServer(Settings(home=drift_home), setup) as server:
        yield server


def _send(live: LiveServer, rows: np.ndarray[Any, Any]) -> None:
    name = httpx.get(f"{live.url}/v2/models/scorer", timeout=30).json()["inputs"][0]["name"]
    for chunk in np.array_split(rows, 10):
        body = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(chunk.shape),
                            "data": chunk.reshape(-1).tolist()}]}
        assert httpx.post(f"{live.url}/v2/models/scorer/infer", json=body, timeout=30).status_code == 200


def test_served_drift_endpoint_metrics_and_cli(live: LiveServer) -> None:
    shifted = RNG.normal(size=(600, 20)).astype(np.float32)
    shifted[:, 5] = shifted[:, 5] * 0.2 + 3.0
    _send(live, shifted)
    assert live.engine.observe.drift.drain(10)

    table = httpx.get(f"{live.url}/v2/models/scorer/drift", timeout=30).json()
    (variant,) = table["variants"]
    assert variant["variant"] == "scorer:1" and variant["rows"] == 600 and variant["status"] == "drift"
    feats = {f["feature"]: f for f in variant["features"]}
    name = next(iter(feats)).split("[")[0]
    assert feats[f"{name}[5]"]["psi"] > 1 and feats[f"{name}[5]"]["status"] == "drift"
    assert feats[f"{name}[0]"]["psi"] < 0.25 and len(feats[f"{name}[0]"]["live"]) == 10
    assert httpx.get(f"{live.url}/v2/models/scorer/versions/1/drift", timeout=30).json()["variants"][0]["rows"] == 600
    assert httpx.get(f"{live.url}/v2/models/nope/drift", timeout=30).status_code == 404

    text = httpx.get(f"{live.url}/metrics", timeout=30).text
    assert metric_value(text, "modelpod_drift_psi", model="scorer", feature=f"{name}[5]") > 1
    assert metric_value(text, "modelpod_drift_score", model="scorer", variant="scorer:1") > 1
    assert metric_value(text, "modelpod_drift_rows_total", model="scorer") == 600

    out = subprocess.run([str(PYTHON), "-m", "modelpod", "drift", live.url, "scorer"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "PSI" in out.stdout and f"{name}[5]" in out.stdout and "drift" in out.stdout
    js = subprocess.run([str(PYTHON), "-m", "modelpod", "drift", live.url, "scorer", "--json"], capture_output=True,
                        text=True, cwd=REPO, timeout=60)
    assert json.loads(js.stdout)["variants"][0]["rows"] == 600
    missing = subprocess.run([str(PYTHON), "-m", "modelpod", "drift", live.url, "nope"], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_the_console_shows_drift_per_model_and_feature(live: LiveServer) -> None:
    from modelpod.console import views

    engine = live.engine
    assert "drift" in views.overview(engine, 0.0)["sections"]  # the model has a reference: the section is on
    _send(live, RNG.normal(size=(300, 20)).astype(np.float32))
    assert engine.observe.drift.drain(10)
    table = views.sections(engine)["drift"]
    assert table["title"] == "Drift" and table["columns"] == ["model", "feature", "psi", "status", "live rows"]
    score, *features = table["rows"]
    assert score[:2] == ["scorer:1", "(score)"] and score[3] in ("ok", "moderate", "drift")
    assert len(features) == 10 and all(r[0] == "scorer:1" and "[" in r[1] for r in features)
    psis = [r[2] for r in features]
    assert psis == sorted(psis, reverse=True) and score[2] == psis[0]  # the score is the largest PSI


def test_drift_reads_nothing_without_a_reference() -> None:
    from servutil import EchoModel

    def setup(engine: InferenceEngine) -> None:
        engine.add_model(EchoModel(), name="echo", version=1)

    with LiveServer(Settings(), setup) as server:
        r = httpx.get(f"{server.url}/v2/models/echo/drift", timeout=30)
        batcher = server.engine.registry.versions("echo")[1].batcher
        assert batcher is not None and batcher.on_batch is None  # no reference: no drift work per batch
    assert r.status_code == 200 and r.json()["variants"][0]["status"] == "no reference"


def test_drift_thread_never_blocks_the_loop() -> None:
    ref = build_reference({"x": REFERENCE})
    assert ref is not None
    from modelpod.observe.drift import DriftWorker

    worker = DriftWorker(size=1)
    monitor = DriftMonitor(ref, "m", "1", "m:1")
    for _ in range(50):  # far more than the queue holds: the extra ones are skipped, counted
        worker.offer(monitor, {"x": REFERENCE[:100]})
    assert worker.drain(10)
    assert monitor.rows + 100 * worker.skipped[("m", "1")] == 5000
    worker.close()


def _old_column_counts(ref: dict[str, Any], name: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Per feature of input ``name``, the counts as the column binner made them before its fast path
    (one 3-D compare of every value with every padded edge, summed over the edges)."""
    feats = [f for f in ref["features"] if f["input"] == name and f["kind"] == "numeric"]
    width = max(len(f["edges"]) for f in feats)
    edges = np.full((len(feats), width), np.inf)
    for row, f in enumerate(feats):
        edges[row, : len(f["edges"])] = f["edges"]
    x = batch[:, [f["index"] for f in feats]].astype(np.float64)
    bins = (x[:, :, None] >= edges[None, :, :]).sum(axis=2)
    bins[~np.isfinite(x)] = width + 1
    return {f["feature"]: np.bincount(bins[:, j], minlength=width + 2)[: len(f["reference"])]
            for j, f in enumerate(feats)}


def test_column_binning_fast_path_gives_the_old_histograms_and_psi() -> None:
    rng = np.random.default_rng(16)
    for case in range(12):
        cols = int(rng.integers(4, 30))
        sample = rng.normal(size=(500, cols)) * rng.uniform(0.1, 100)
        sample[:, 1] = rng.integers(0, 3, size=500)  # few distinct values: fewer edges than the others
        if case % 2:
            sample[:, cols // 2 + 1] = np.nan  # no feature for this column: the others are gathered, not sliced
        dtype = [np.float32, np.float64, np.int64][case % 3]
        ref = build_reference({"x": sample.astype(dtype) if dtype is not np.int64 else
                               np.nan_to_num(sample).astype(np.int64)})
        assert ref is not None
        monitor = DriftMonitor(ref, "m", "1", "m:1", window=10**9)
        want: dict[str, np.ndarray] = {}
        for _ in range(int(rng.integers(1, 6))):
            live = rng.normal(size=(int(rng.integers(1, 300)), cols)) * rng.uniform(0.1, 100)
            live[rng.random(live.shape) < 0.05] = rng.choice([np.nan, np.inf, -np.inf])
            edge_of = ref["features"][-1]
            on_edges = min(len(edge_of["edges"]), len(live))
            live[:on_edges, edge_of["index"]] = edge_of["edges"][:on_edges]  # values right on the edges
            live = live.astype(dtype) if dtype is not np.int64 else np.nan_to_num(live, posinf=7, neginf=-7).astype(
                np.int64)
            monitor.observe({"x": live})
            for k, v in _old_column_counts(ref, "x", live).items():
                want[k] = want.get(k, 0) + v
        got = {f.name: f.live() for f in monitor.features}
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), case
        refs = {f["feature"]: np.asarray(f["reference"]) for f in ref["features"]}
        expected = {k: psi(v, refs[k]) for k, v in want.items() if v.sum() > 0}
        assert dict(monitor.scores()) == (expected if monitor.window_rows >= MIN_ROWS else {})
