"""Serving policy: manifest defaults < config globals < settings (CLI) < config per model."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpod.errors import UsageError
from modelpod.pod import Serving
from modelpod.serving.config import BatchPolicy, ServeConfig
from modelpod.settings import Settings

MANIFEST = Serving(max_batch_rows=8, max_batch_wait_ms=1.0, max_queue=50, max_concurrency=2, timeout_s=9.0)


def test_manifest_defaults_apply_when_nothing_overrides() -> None:
    policy = ServeConfig.from_settings(Settings()).policy("m", MANIFEST)
    assert policy == BatchPolicy(8, 1.0, 50, 2, 9.0)


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "max_batch_rows: 16\nmax_queue: 10\n"
        "models:\n  special:\n    max_batch_rows: 64\n    timeout_s: 2\n"
    )
    config = ServeConfig.load(Settings(config=path, max_batch_wait_ms=7.0, max_batch_rows=32))
    plain = config.policy("plain", MANIFEST)
    assert (plain.max_batch_rows, plain.max_batch_wait_ms, plain.max_queue, plain.timeout_s) == (32, 7.0, 10, 9.0)
    special = config.policy("special", MANIFEST)
    assert (special.max_batch_rows, special.max_batch_wait_ms, special.timeout_s) == (64, 7.0, 2.0)


@pytest.mark.parametrize("text, message", [
    ("max_batch_size: 4\n", "unknown key"),
    ("models:\n  m:\n    max_queue: many\n", "must be a number"),
    ("max_batch_rows: 2.5\n", "must be an integer"),
    ("- a\n- b\n", "must hold a mapping"),
    ("max_queue: 0\n", "max_queue must be >= 1"),
])
def test_bad_config_is_refused_with_a_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        ServeConfig.load(Settings(config=path)).policy("m", MANIFEST)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--config"):
        ServeConfig.load(Settings(config=tmp_path / "absent.yaml"))


def test_nonfinite_policy_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("nonfinite: reject\nmodels:\n  lenient:\n    nonfinite: pass\n    max_batch_rows: 4\n")
    config = ServeConfig.load(Settings(config=path))
    assert config.nonfinite("other") == "reject" and config.nonfinite("lenient") == "pass"
    assert config.policy("lenient").max_batch_rows == 4
    assert ServeConfig.load(Settings()).nonfinite("any") == "pass"
    path.write_text("nonfinite: drop\n")
    with pytest.raises(UsageError, match="nonfinite must be one of pass, reject"):
        ServeConfig.load(Settings(config=path))
