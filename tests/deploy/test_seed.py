"""The in-server canary's init step: each image's pod into the replica's store, under an alias."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from modelpod.deploy.seed import main
from modelpod.packing import pack
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.settings import Settings
from modelpod.store import Store


def test_two_images_pods_are_served_side_by_side(tmp_path: Path, sklearn_model: tuple[Path, Any, object],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, sample, _ = sklearn_model
    source = Store(tmp_path / "source")  # stands in for the two images' /opt/modelpod/pod
    two = pack(path, "lr", source, sample=sample)
    three = pack(path, "lr", source, sample=sample, labels={"stage": "candidate"})
    replica = tmp_path / "replica-tmp" / "modelpod"
    for rec, alias in ((two, "stable"), (three, "canary")):
        pod_dir = source.open(rec.ref).path
        assert main(["--home", str(replica), "--alias", alias, "--pod", str(pod_dir)]) == 0
    out = capsys.readouterr().out
    assert "lr@stable -> lr:1" in out and "lr@canary -> lr:2" in out
    store = Store(replica)
    assert store.get("lr@stable").digest == two.digest and store.get("lr@canary").digest == three.digest

    # What the server's args name: both load, as two versions of one model, side by side.
    settings = Settings(home=replica)
    engine = InferenceEngine(settings, ServeConfig.load(settings))
    entries = [engine.add("lr@stable"), engine.add("lr@canary")]
    assert sorted(e.version for e in entries) == [1, 2]  # type: ignore[type-var]
    asyncio.run(engine.start())
    try:
        assert all(e.available for e in entries)
    finally:
        asyncio.run(engine.close())


def test_a_missing_pod_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path / "s"), "--alias", "stable", "--pod", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
