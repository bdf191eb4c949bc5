"""``modelpod batch det --input photos/ --format images --output det.parquet``: one row per detection,
in the original image's pixels; a corrupt image quarantined with its reason; a stopped job resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from graphs import batched_detector
from imgutil import canvas, encode

from modelpod import api
from modelpod.batch import run
from modelpod.cli import main
from modelpod.store import Store

pytestmark = pytest.mark.timeout(120)

# name -> (height, width, bright rectangle or None), in JPEG, PNG and WebP; sizes all differ.
PHOTOS = {"a.jpg": (40, 70, (5, 6, 30, 33)), "b.png": (90, 45, (10, 50, 40, 85)), "c.webp": (64, 64, (30, 2, 60, 60)),
          "d/e.png": (33, 100, (60, 3, 97, 30)), "f.png": (80, 80, (0, 0, 50, 20)),
          "g.jpeg": (120, 60, (20, 20, 40, 100))}
COLUMNS = ["path", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "d").mkdir(parents=True)
    for name, (h, w, box) in PHOTOS.items():
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
        extra: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        (folder / name).write_bytes(encode(canvas(h, w, box), fmt, **extra))
    (folder / "notes.txt").write_text("not a photo: left out of an image folder")
    (folder / "broken.jpg").write_bytes(encode(canvas(50, 50, (1, 1, 9, 9)), "JPEG")[:300])  # truncated
    return folder


@pytest.fixture
def det(tmp_path: Path, store: Store) -> Store:
    api.pack(batched_detector(tmp_path / "det.onnx"), "det", store=store)
    return store


def _check_rows(rows: list[dict[str, Any]]) -> None:
    expected = []
    for name, (_, _, box) in sorted(PHOTOS.items()):
        if box is not None:  # the graph answers each box as class 1 (0.9) and class 0 (0.5)
            expected += [(name, 1, "bright"), (name, 0, "dim")]
    assert [(r["path"], r["class_id"], r["class_name"]) for r in rows] == expected
    for r in rows:
        box = PHOTOS[r["path"]][2]
        assert box is not None
        got = [r["x1"], r["y1"], r["x2"], r["y2"]]
        assert max(abs(g - w) for g, w in zip(got, box, strict=True)) <= 1.5, (r, box)  # JPEG edges blur
        assert r["score"] == pytest.approx(0.9 if r["class_id"] == 1 else 0.5, abs=1e-5)


def test_one_row_per_detection_and_the_corrupt_image_quarantined(
        photos: Path, det: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "det.parquet"
    capsys.readouterr()
    rc = main(["--home", str(det.home), "batch", "det", "--input", str(photos), "--format", "images",
               "--output", str(out), "--json"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["rows"] == len(PHOTOS) + 1 and summary["errors"] == 1
    table = pq.read_table(out)
    assert table.column_names == COLUMNS
    _check_rows(table.to_pylist())
    errors = [json.loads(line) for f in tmp_path.glob("det*errors*") for line in f.read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["file"].endswith("broken.jpg")
    assert "cannot decode it" in errors[0]["reason"]


class Stop(Exception):
    pass


def test_a_stopped_job_resumes_and_writes_every_detection_once(photos: Path, det: Store, tmp_path: Path) -> None:
    out = tmp_path / "det.parquet"
    seen: list[dict[str, Any]] = []

    def stop_after_two(event: dict[str, Any]) -> None:
        if event["event"] == "part":
            seen.append(event)
            if len(seen) == 2:
                raise Stop

    with pytest.raises(Stop):
        run("det", photos, out, store=det, format="images", part_rows=2, batch_rows=2, on_event=stop_after_two)
    assert not out.exists()
    summary = run("det", photos, out, store=det, format="images", part_rows=2, batch_rows=2)
    assert summary.resumed_parts == 2 and summary.errors == 1
    _check_rows(pq.read_table(out).to_pylist())
