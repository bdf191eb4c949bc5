"""Nothing runs that the user did not name: store references versus pod directories.

A directory in the working directory that happens to share a model's name is never loaded by the
repository API, the registry, ``modelpod.load`` or the CLI; a directory is read only when it is
written as a path. A digest reference loads exactly that content or answers 404.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from servutil import LiveServer

import modelpod
from modelpod.cli import main
from modelpod.errors import NotFoundError, UsageError
from modelpod.packing import pack
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import PodRecord, Store

Model = tuple[Path, np.ndarray, object]


@pytest.fixture
def decoy(tmp_path: Path, sklearn_model: Model, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, PodRecord,
                                                                                                    Path]]:
    """A store holding ``lr``, and a working directory holding other pods as ``lr/`` and ``ghost/``."""
    path, sample, _ = sklearn_model
    store = Store(tmp_path / "home")
    rec = pack(path, "lr", store, sample=sample)
    elsewhere = Store(tmp_path / "elsewhere")
    other = pack(path, "lr", elsewhere, sample=sample, labels={"from": "the working directory"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("lr", "ghost"):
        shutil.copytree(elsewhere.open(other.ref).path, cwd / name)
    monkeypatch.chdir(cwd)
    assert other.digest != rec.digest
    yield store, rec, cwd


def test_is_path() -> None:
    from modelpod.store import is_path

    assert [is_path(t) for t in ("lr", "lr:1", "lr@prod", f"lr@sha256:{'a' * 64}")] == [False] * 4
    assert all(is_path(t) for t in ("./lr", "/abs/lr", "pods/lr", "~/lr", ".", ".."))


def test_registry_takes_store_refs_only(decoy: tuple[Store, PodRecord, Path]) -> None:
    store, rec, cwd = decoy
    assert InferenceEngine(Settings(home=store.home)).registry.add_ref("lr").manifest.digest == rec.digest  # type: ignore[union-attr]
    engine = InferenceEngine(Settings(home=store.home))
    with pytest.raises(NotFoundError):
        engine.registry.add_ref("ghost")
    # The command line's rule: a bare word is a store name, a path is a directory.
    assert engine.add("lr").manifest.digest == rec.digest  # type: ignore[union-attr]
    with pytest.raises(NotFoundError, match=r"ghost is a pod directory: write it as a path \(\./ghost\)"):
        engine.add("ghost")
    entry = engine.add("./ghost")
    assert entry.source.path == cwd / "ghost" and entry.manifest is not None
    assert entry.manifest.labels == {"from": "the working directory"}
    with pytest.raises(UsageError, match="no pod directory"):
        engine.add("./missing")


@pytest.fixture
def live(decoy: tuple[Store, PodRecord, Path]) -> Iterator[tuple[httpx.Client, PodRecord]]:
    store, rec, _ = decoy
    with LiveServer(Settings(home=store.home), lambda engine: None) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, rec


def test_repository_load_never_reads_the_working_directory(live: tuple[httpx.Client, PodRecord]) -> None:
    client, rec = live
    r = client.post("/v2/repository/models/ghost/load", json={})
    assert r.status_code == 404 and "ghost" in r.json()["error"]
    assert client.get("/v2/models/ghost").status_code == 404
    r = client.post("/v2/repository/models/lr/load", json={})
    assert r.status_code == 200
    # What is served is the store's lr, not the lr/ directory beside the server.
    index = client.post("/v2/repository/index", json={}).json()
    assert [(m["name"], m["state"]) for m in index] == [("lr", "READY")]


def test_unknown_digest_is_404_and_a_known_one_loads(live: tuple[httpx.Client, PodRecord]) -> None:
    client, rec = live
    unknown = "sha256:" + "0" * 64
    r = client.post(f"/v2/repository/models/lr@{unknown}/load", json={})
    assert r.status_code == 404 and unknown in r.json()["error"]
    assert client.post(f"/v2/repository/models/lr@{rec.digest}/load", json={}).status_code == 200
    # Once lr is served, an unknown digest still does not match it.
    r = client.post(f"/v2/repository/models/lr@{unknown}/load", json={})
    assert r.status_code == 404


def test_python_api_and_cli_read_a_directory_only_when_written_as_a_path(
        decoy: tuple[Store, PodRecord, Path], sklearn_model: Model, capsys: pytest.CaptureFixture[str]) -> None:
    store, rec, cwd = decoy
    assert modelpod.open_pod("lr", store=store).digest == rec.digest
    with pytest.raises(NotFoundError):
        modelpod.load("ghost", store=store)
    assert modelpod.open_pod("./ghost").manifest.labels == {"from": "the working directory"}
    assert modelpod.open_pod(cwd / "ghost").path == cwd / "ghost"
    np.save(cwd / "x.npy", sklearn_model[1])
    home = ["--home", str(store.home)]
    assert main([*home, "verify", "lr", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == rec.digest
    assert main([*home, "predict", "ghost", "--input", "x.npy"]) == 2
    assert "no pod 'ghost' in the store" in capsys.readouterr().err
    assert main([*home, "predict", "./ghost", "--input", "x.npy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["shape"] == [5]
