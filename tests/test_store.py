from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from modelpod.errors import IntegrityError, NotFoundError, UsageError
from modelpod.packing import pack
from modelpod.pod import MANIFEST_NAME
from modelpod.store import Ref, Store


def _pack(store: Store, model: tuple[Path, np.ndarray, object], name: str = "lr") -> int:
    path, sample, _ = model
    return pack(path, name, store, sample=sample).version


def test_versions_aliases_and_lookup(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    assert [_pack(store, sklearn_model) for _ in range(3)] == [1, 2, 3]
    store.tag("lr", 2, "production")
    assert store.get("lr@production").version == 2
    assert store.get("lr").version == 3 and store.get("lr@latest").version == 3
    assert store.get("lr:1").aliases == ()
    assert store.get("lr:2").aliases == ("production",)
    store.tag("lr", 3, "production")  # moving an alias
    assert store.get("lr@production").version == 3
    rec = store.get("lr:1")
    assert store.get(rec.digest).digest == rec.digest
    assert store.get(f"lr@{rec.digest}").name == "lr"
    with pytest.raises(NotFoundError, match="lr:9"):
        store.get("lr:9")
    with pytest.raises(NotFoundError):
        store.get("lr@canary")
    with pytest.raises(UsageError):
        store.tag("lr", 1, "latest")


def test_identical_files_are_stored_once(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    _pack(store, sklearn_model)
    _pack(store, sklearn_model, "other")
    assert len(list(store.blobs.iterdir())) == len(store.get("lr:1").manifest.files)  # model + sample, once


def test_remove_collects_unreferenced_blobs(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    _pack(store, sklearn_model)
    _pack(store, sklearn_model)
    store.tag("lr", 1, "production")
    store.remove("lr:1")
    assert len(list(store.blobs.iterdir())) == len(store.get("lr:2").manifest.files)  # still used by lr:2
    with pytest.raises(NotFoundError):
        store.get("lr@production")
    with pytest.raises(UsageError, match="--all"):
        store.remove("lr")
    store.remove("lr", all_versions=True)
    assert store.list() == [] and list(store.blobs.iterdir()) == []
    # Version numbers are never reused, even after removal.
    assert _pack(store, sklearn_model) == 3


def test_open_refuses_a_tampered_blob(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    _pack(store, sklearn_model)
    pod = store.open("lr:1")
    victim = pod.path / pod.manifest.files[0].path
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=pod.manifest.files[0].path):
        store.open("lr:1")


def test_open_refuses_a_tampered_manifest(store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:
    _pack(store, sklearn_model)
    pod = store.open("lr:1")
    mpath = pod.path / MANIFEST_NAME
    mpath.write_text(mpath.read_text().replace("allow_pickle: false", "allow_pickle: true"))
    with pytest.raises(IntegrityError, match=MANIFEST_NAME):
        store.open("lr:1")


def _pack_in_child(home: str, model_path: str, sample_path: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    s = Store(Path(home))
    queue.put(pack(model_path, "lr", s, sample=sample_path).version)


def test_concurrent_packs_never_share_a_version(
    tmp_path: Path, sklearn_model: tuple[Path, np.ndarray, object]
) -> None:
    path, sample, _ = sklearn_model
    np.save(tmp_path / "s.npy", sample)
    Store(tmp_path / "home")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pack_in_child, args=(str(tmp_path / "home"), str(path),
                                                       str(tmp_path / "s.npy"), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    versions = sorted(queue.get(timeout=5) for _ in procs)
    assert versions == [1, 2, 3, 4]


@pytest.mark.parametrize("text", ["Bad", "a:b", "a@", "a@1x$", "sha256:xyz"])
def test_bad_refs(text: str) -> None:
    with pytest.raises(UsageError):
        Ref.parse(text)


def test_ref_forms() -> None:
    assert Ref.parse("a:3") == Ref("a", version=3)
    assert Ref.parse("a@prod") == Ref("a", alias="prod")
    assert Ref.parse("a") == Ref("a")
    d = "sha256:" + "a" * 64
    assert Ref.parse(d) == Ref("", digest=d)
    assert Ref.parse("a@" + d) == Ref("a", digest=d)
