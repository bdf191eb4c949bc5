"""The image's entrypoint turns `docker run IMAGE ARGS` into a serve or a batch command line."""

from __future__ import annotations

import pytest

from modelpod import entry


def test_arguments_go_to_serve_unless_they_start_with_batch() -> None:
    pod = "/opt/modelpod/pod"
    assert entry.argv_for(pod, []) == ["serve", pod]
    assert entry.argv_for(pod, ["--port", "9000"]) == ["serve", pod, "--port", "9000"]
    assert entry.argv_for(pod, ["serve", "--no-grpc"]) == ["serve", pod, "--no-grpc"]
    assert entry.argv_for(pod, ["batch", "--input", "a.csv", "--output", "b.csv"]) == [
        "batch", pod, "--input", "a.csv", "--output", "b.csv"]
    assert entry.argv_for(pod, ["batch", "merge", "--output", "b.csv"]) == ["batch", "merge", "--output", "b.csv"]


def test_an_image_without_batch_support_says_how_to_build_one(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert entry.main(["/opt/modelpod/pod", "batch", "--input", "x", "--output", "y.csv"]) == 2
    assert "modelpod build REF --with batch" in capsys.readouterr().err
