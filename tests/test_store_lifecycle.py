"""The store's lifecycle: killed writers leave nothing behind, ``gc`` frees and reports, and blob
references hold while several processes pack, import and remove at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpod.archive import export, import_archive
from modelpod.cli import main
from modelpod.packing import pack
from modelpod.store import Store

Model = tuple[Path, np.ndarray, object]


def _killed_in_add(home: Path, model: Path, sample: Path, where: str) -> None:
    """Run ``pack`` in a child that SIGKILLs itself at ``where`` inside Store.add (as a crash would)."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from modelpod.packing import pack\n"
        "from modelpod.store import Store\n"
        "where = sys.argv[4]\n"
        "original = getattr(Store, where)\n"
        "def die(*a, **k):\n"
        "    if where == '_record_new':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    result = original(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "setattr(Store, where, die)\n"
        "pack(sys.argv[2], 'lr', Store(Path(sys.argv[1])), sample=sys.argv[3])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(home), str(model), str(sample), where],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _leftovers(home: Path) -> dict[str, list[str]]:
    return {d: sorted(p.name for p in (home / d).iterdir()) for d in ("tmp", "blobs/sha256", "pods")}


@pytest.mark.parametrize("where", ["_record_new", "_materialise"])
def test_a_killed_pack_leaves_nothing_after_the_next_store_operation(
        where: str, tmp_path: Path, sklearn_model: Model) -> None:
    path, sample, _ = sklearn_model
    np.save(tmp_path / "x.npy", sample)
    home = tmp_path / "home"
    Store(home)
    _killed_in_add(home, path, tmp_path / "x.npy", where)
    left = _leftovers(home)
    assert left["tmp"], "the child should have died holding its staging"
    store = Store(home)  # the next store operation
    if where == "_record_new":  # killed before the pod was recorded: its blob goes with its staging
        assert _leftovers(home) == {"tmp": [], "blobs/sha256": [], "pods": []}
        assert store.list() == []
    else:  # recorded, then killed: the pod is whole and opens (its directory is built again)
        assert _leftovers(home)["tmp"] == []
        (rec,) = store.list()
        assert list(store.open(rec.ref).problems()) == []


def test_a_killed_import_leaves_nothing_behind(tmp_path: Path, sklearn_model: Model) -> None:
    path, sample, _ = sklearn_model
    src = Store(tmp_path / "src")
    tar = export(src.open(pack(path, "lr", src, sample=sample).ref), tmp_path / "lr.tar")
    home = tmp_path / "home"
    Store(home)
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom modelpod import archive\n"
            "from modelpod.store import Store\n"
            "real = archive.extract\n"
            "def extract(*a, **k):\n    real(*a, **k)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "archive.extract = extract\n"
            "archive.import_archive(Path(sys.argv[2]), Store(Path(sys.argv[1])))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(home), str(tar)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _leftovers(home)["tmp"]
    assert main(["--home", str(home), "list", "--json"]) == 0
    assert _leftovers(home) == {"tmp": [], "blobs/sha256": [], "pods": []}


def test_gc_reports_and_frees_what_nothing_references(tmp_path: Path, sklearn_model: Model,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, sample, _ = sklearn_model
    home = tmp_path / "home"
    store = Store(home)
    keep = pack(path, "lr", store, sample=sample)
    # What older versions or crashes left: an unreferenced blob, a stray pod directory, staging
    # without a lock (old enough), and the staging of a dead owner.
    orphan = store.blobs / ("ab" * 32)
    orphan.write_bytes(b"x" * 1000)
    (store.pods / ("cd" * 32)).mkdir()
    np.save(tmp_path / "x.npy", sample)
    _killed_in_add(home, path, tmp_path / "x.npy", "_record_new")
    old = store.tmp / "stage-old"
    old.mkdir()
    (old / "part").write_bytes(b"y" * 500)
    os.utime(old, (0, 0))
    before = _leftovers(home)

    assert main(["--home", str(home), "gc", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and report["blobs"] == 1 and report["blob_bytes"] == 1000
    assert report["pod_dirs"] == 1 and report["staging"] == 3 and report["staging_bytes"] >= 500
    assert report["freed_bytes"] == report["blob_bytes"] + report["staging_bytes"]
    assert _leftovers(home) == before  # a dry run changes nothing

    assert main(["--home", str(home), "gc", "--json"]) == 0
    freed = json.loads(capsys.readouterr().out)
    assert {**freed, "dry_run": True} == report
    assert _leftovers(home) == {"tmp": [], "blobs/sha256": sorted(f.sha256 for f in keep.manifest.files),
                                "pods": [keep.digest.removeprefix("sha256:")]}
    assert list(Store(home).open(keep.ref).problems()) == []
    assert main(["--home", str(home), "gc"]) == 0
    assert "freed 0 B: 0 unreferenced blobs" in capsys.readouterr().out


def test_a_blob_in_use_by_an_add_survives_a_concurrent_remove(tmp_path: Path, sklearn_model: Model,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The worst moment: another process removes the last pod holding a blob after this add has
    # seen that blob exist and before this add records its pod.
    path, sample, _ = sklearn_model
    home = tmp_path / "home"
    first = pack(path, "lr", Store(home), sample=sample)
    other = Store(home)
    real = Store._put_blob

    def put_then_remove(self: Store, *args: object) -> Path:
        dest = real(self, *args)  # type: ignore[arg-type]
        if other.list("lr"):
            other.remove(first.ref)
        return dest

    monkeypatch.setattr(Store, "_put_blob", put_then_remove)
    second = pack(path, "lr", Store(home), sample=sample, labels={"v": "2"})
    monkeypatch.undo()
    assert [r.version for r in Store(home).list()] == [second.version]
    assert list(Store(home).open(second.ref).problems()) == []
    assert Store(home).gc(dry_run=True).blobs == 0


# -- four processes at once ----------------------------------------------------------------------
def _worker(home: str, model: str, sample: str, archive: str, seed: int, rounds: int) -> None:
    rng = np.random.default_rng(seed)
    store = Store(Path(home))
    mine: list[str] = []
    for i in range(rounds):
        action = i % 3
        if action == 0:
            mine.append(pack(model, "lr", store, sample=sample, labels={"w": str(seed % 2)}).ref)
        elif action == 1:
            # A name of its own: importing the same pod again under one name gives the same version.
            mine.append(import_archive(Path(archive), store, name=f"imp-{seed}-{i}").ref)
        elif mine:
            store.remove(mine.pop(int(rng.integers(len(mine)))))


def test_four_processes_pack_import_and_remove_at_once(tmp_path: Path, sklearn_model: Model) -> None:
    path, sample, _ = sklearn_model
    np.save(tmp_path / "x.npy", sample)
    src = Store(tmp_path / "src")
    tar = export(src.open(pack(path, "lr", src, sample=sample).ref), tmp_path / "lr.tar")
    home = tmp_path / "home"
    Store(home)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(home), str(path), str(tmp_path / "x.npy"), str(tar), seed, 9))
             for seed in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=280)
        assert p.exitcode == 0
    store = Store(home)
    survivors = store.list()
    assert len(survivors) == 4 * 3  # each worker: three rounds of pack, import, remove one of its own
    for rec in survivors:
        assert main(["--home", str(home), "verify", rec.ref]) == 0
    referenced = {f.sha256 for rec in survivors for f in rec.manifest.files}
    store.gc()
    assert {p.name for p in store.blobs.iterdir()} == referenced
    assert {p.name for p in store.pods.iterdir()} == {r.digest.removeprefix("sha256:") for r in survivors}
    assert list(store.tmp.iterdir()) == []
