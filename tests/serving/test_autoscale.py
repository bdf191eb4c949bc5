"""Autoscaler decisions on a fake clock, and the replica policy: parsing, precedence, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpod.cli import main
from modelpod.errors import UsageError
from modelpod.pod import Manifest, Serving
from modelpod.serving.autoscale import Autoscaler, demand_of
from modelpod.serving.config import ServeConfig
from modelpod.serving.scaling import ReplicaPolicy, parse_size
from modelpod.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scaler(**policy: object) -> tuple[Autoscaler, Clock]:
    clock = Clock()
    base: dict[str, object] = {"isolation": "process", "min": 1, "max": 4, "target_inflight": 2.0,
                               "upscale_delay_s": 1.0, "downscale_delay_s": 10.0}
    base.update(policy)
    return Autoscaler(ReplicaPolicy(**base), clock), clock  # type: ignore[arg-type]


def test_scales_up_only_after_the_upscale_delay() -> None:
    a, clock = scaler()
    assert a.decide(1, demand=5) is None  # wants 3, but only just
    clock.now += 0.5
    assert a.decide(1, demand=5) is None
    clock.now += 0.6
    d = a.decide(1, demand=5)
    assert d is not None and (d.before, d.after, d.direction) == (1, 3, "up")


def test_a_dip_resets_the_upscale_timer() -> None:
    a, clock = scaler()
    assert a.decide(1, demand=6) is None
    clock.now += 0.9
    assert a.decide(1, demand=1) is None  # back at target: the wait starts over
    clock.now += 0.9
    assert a.decide(1, demand=6) is None
    clock.now += 0.5
    assert a.decide(1, demand=6) is None
    clock.now += 0.6
    assert a.decide(1, demand=6) is not None


def test_scales_down_after_the_longer_downscale_delay() -> None:
    a, clock = scaler()
    assert a.decide(3, demand=0) is None
    clock.now += 5
    assert a.decide(3, demand=0) is None  # past the upscale delay, not the downscale one
    clock.now += 5.1
    d = a.decide(3, demand=0)
    assert d is not None and (d.after, d.direction) == (1, "down")  # never below min


def test_target_is_clamped_to_max() -> None:
    a, clock = scaler(upscale_delay_s=0)
    d = a.decide(1, demand=100)
    assert d is not None and d.after == 4
    assert a.decide(4, demand=100) is None


def test_steady_demand_at_target_changes_nothing() -> None:
    a, clock = scaler(upscale_delay_s=0, downscale_delay_s=0)
    for _ in range(5):
        assert a.decide(2, demand=4) is None  # exactly target_inflight per replica
        clock.now += 100


def test_scale_to_zero_and_back_at_once() -> None:
    a, clock = scaler(min=0, max=2, downscale_delay_s=3.0, upscale_delay_s=60.0)
    assert a.decide(1, demand=0) is None
    clock.now += 3.1
    d = a.decide(1, demand=0)
    assert d is not None and d.after == 0
    up = a.decide(0, demand=1)  # the next request: no upscale delay from zero
    assert up is not None and (up.after, up.direction) == (1, "up")


def test_a_target_outside_min_max_moves_in_at_once() -> None:
    a, _ = scaler(min=2, max=3, upscale_delay_s=60, downscale_delay_s=60)
    d = a.decide(1, demand=0)
    assert d is not None and d.after == 2
    d = a.decide(5, demand=0)
    assert d is not None and d.after == 3


def test_demand_counts_running_held_and_queued_batches() -> None:
    assert demand_of(0, 0, 0, 32) == 0
    assert demand_of(1, 0, 63, 32) == 3  # 63 queued rows make two more batches
    assert demand_of(2, 1, 1, 1) == 4


# -- the policy ----------------------------------------------------------------------------------
def config(data: dict[str, object] | None = None, **settings: object) -> ServeConfig:
    return ServeConfig.from_settings(Settings(**settings), data)  # type: ignore[arg-type]


def test_precedence_manifest_then_file_then_flags_then_model_entry() -> None:
    serving = Serving(isolation="process", replicas={"min": 2, "max": 2, "target_inflight": 3}, max_memory="1GiB")
    assert config().replica_policy("m", serving) == ReplicaPolicy("process", 2, 2, 3.0, max_memory=2**30)
    cfg = config({"replicas": 3, "models": {"m": {"replicas": {"max": 6}, "isolation": "thread"}}}, replicas="1:4")
    p = cfg.replica_policy("m", serving)
    assert (p.isolation, p.min, p.max, p.target_inflight) == ("thread", 1, 6, 3.0)
    other = cfg.replica_policy("other", serving)
    assert (other.isolation, other.min, other.max) == ("process", 1, 4)  # the flags beat the file's global
    assert config().replica_policy("m") == ReplicaPolicy()  # thread by default


def test_flags_apply_to_every_model() -> None:
    p = config(isolation="process", replicas="0:3", target_inflight=1.5, upscale_delay_s=0.2,
               downscale_delay_s=5, max_memory="512MiB").replica_policy("any")
    assert p == ReplicaPolicy("process", 0, 3, 1.5, 0.2, 5.0, 512 * 2**20)
    assert config(replicas="2").replica_policy("any").min == 2


@pytest.mark.parametrize(("data", "message"), [
    ({"isolation": "docker"}, "isolation must be one of thread, process"),
    ({"replicas": "4:1"}, r"replicas.min \(4\) is above replicas.max \(1\)"),
    ({"replicas": "two"}, "replicas must be N or MIN:MAX"),
    ({"replicas": {"max": 0}}, "replicas.max must be >= 1"),
    ({"replicas": {"min": -1, "max": 2}}, "replicas.min must be >= 0"),
    ({"replicas": {"mni": 1}}, "unknown key replicas.mni"),
    ({"replicas": {"target_inflight": 0}}, "target_inflight must be > 0"),
    ({"replicas": {"min": 1.5}}, "replicas.min must be an integer"),
    ({"replicas": {"upscale_delay_s": "soon"}}, "upscale_delay_s must be a number"),
    ({"max_memory": "lots"}, "max_memory must be a size"),
    ({"models": {"m": {"replicas": [1, 2]}}}, "models.m: replicas must be a mapping"),
])
def test_bad_values_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        config(data)


def test_sizes() -> None:
    assert parse_size("2GiB", "x") == 2 * 2**30
    assert parse_size("1.5G", "x") == 1_500_000_000
    assert parse_size(1000, "x") == 1000
    for bad in ("-1MB", "0", True, "1 parsec"):
        with pytest.raises(UsageError):
            parse_size(bad, "x")


def test_manifests_without_replica_keys_keep_their_digest() -> None:
    """The new serving keys are left out when unset: an old pod's manifest (and digest) is unchanged."""
    data = Manifest(name="m", framework="python", files=()).to_dict()
    assert set(data["serving"]) == {"max_batch_rows", "max_batch_wait_ms", "max_queue", "max_concurrency",
                                    "timeout_s"}
    with_keys = Manifest(name="m", framework="python", files=(), serving=Serving(isolation="process",
                                                                                 replicas={"max": 2}))
    again = Manifest.from_dict(with_keys.to_dict())
    assert again.serving.isolation == "process" and again.serving.replicas == {"max": 2}
    assert again.digest == with_keys.digest != Manifest(name="m", framework="python", files=()).digest


def exit_code(argv: list[str]) -> int:
    """``modelpod ARGV``'s exit status (argparse exits by itself; modelpod's errors return it)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize("flags", [["--replicas", "3:1"], ["--replicas", "x"], ["--isolation", "vm"],
                                   ["--max-memory", "much"], ["--target-inflight", "0"]])
def test_serve_refuses_bad_flags_with_exit_2(flags: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["--home", str(tmp_path), "serve", "nothing", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert any(word in err for word in ("replicas", "isolation", "max_memory", "target_inflight"))


def test_serve_refuses_a_bad_config_file_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("models:\n  lr:\n    isolation: process\n    replicas: {min: 3, max: 2}\n")
    assert exit_code(["--home", str(tmp_path), "serve", "lr", "--port", "0", "--config", str(cfg)]) == 2
    assert "replicas.min (3) is above replicas.max (2)" in capsys.readouterr().err


def test_serve_refuses_a_negative_inline_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["--home", str(tmp_path), "serve", "nothing", "--port", "0", "--inline-max-ms", "-1"]) == 2
    assert "--inline-max-ms must be >= 0" in capsys.readouterr().err
