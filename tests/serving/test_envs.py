"""Which pods get their own environment, and how the config and command line say so (no builds here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import yaml

from modelpod.cli import main
from modelpod.errors import UsageError
from modelpod.packing import pack
from modelpod.serving.config import ServeConfig
from modelpod.serving.engine import InferenceEngine
from modelpod.serving.envbuild import EnvCache, lock_key
from modelpod.serving.envs import choose, dist_info_versions, mismatches
from modelpod.settings import Settings
from modelpod.store import Store

NUMPY = metadata.version("numpy")
SKLEARN = metadata.version("scikit-learn")


def test_pins_the_server_holds_need_no_environment() -> None:
    assert mismatches([f"numpy=={NUMPY}", f"Scikit_Learn=={SKLEARN}"]) == []
    choice = choose([f"numpy=={NUMPY}", f"scikit-learn=={SKLEARN}"])
    assert not choice.own and "satisf" in choice.reason


def test_another_release_or_a_missing_package_needs_one() -> None:
    found = mismatches(["scikit-learn==1.0.2", f"numpy=={NUMPY}", "no-such-dist-modelpod==1.0"])
    assert [(m.pin, m.installed) for m in found] == [("scikit-learn==1.0.2", SKLEARN),
                                                     ("no-such-dist-modelpod==1.0", None)]
    choice = choose(["scikit-learn==1.0.2", f"numpy=={NUMPY}"])
    assert choice.own
    assert f"scikit-learn==1.0.2 (here {SKLEARN})" in choice.reason
    assert choice.pins == ("numpy==" + NUMPY, "scikit-learn==1.0.2")


def test_serving_machinery_and_other_platforms_do_not_count() -> None:
    # The server's pyyaml/orjson/grpcio serve any pod; a pin only for Windows does not apply here.
    assert mismatches(["pyyaml==5.1", "orjson==3.0.0", "grpcio==1.0.0", "pywin32==306; sys_platform == 'win32'"]) == []
    # numpy is not machinery: arrays and pickles depend on it.
    assert [m.pin for m in mismatches(["numpy==1.0.0"])] == ["numpy==1.0.0"]


def test_the_dist_info_folder_names_give_the_versions_importlib_metadata_reads() -> None:
    # The fast path trusts the folder name's version only when it is the pin, character for character;
    # here every distribution installed in this environment says the same as its METADATA.
    found = dist_info_versions()
    assert {"numpy", "scikit-learn", "pyyaml"} <= set(found)
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name in found and Path(str(dist._path)).name.endswith(".dist-info"):  # type: ignore[attr-defined]
            assert found[name] == dist.version, name


def test_a_lock_this_environment_holds_is_decided_without_packaging(tmp_path: Path) -> None:
    """An image's runtime layer has no packaging: pins it holds are still seen to hold, and a pin it
    does not hold still needs packaging (choose then falls back to the server's environment)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["packaging"] = None  # as in an image's runtime layer
        from modelpod.serving.envs import choose, dist_info_versions, mismatches
        assert mismatches(["numpy=={NUMPY}", "Scikit_Learn=={SKLEARN}", "pyyaml==5.1"]) == []
        assert "satisf" in choose(["numpy=={NUMPY}"]).reason
        assert "no packaging here" in choose(["numpy==1.0.0"]).reason
        assert "packaging" not in sys.modules or sys.modules["packaging"] is None
        assert "importlib.metadata" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_modes_force_either_way() -> None:
    assert choose([f"numpy=={NUMPY}"], "own").own
    assert not choose(["scikit-learn==1.0.2"], "server").own
    with pytest.raises(UsageError, match="env must be one of auto, own, server"):
        choose([], "docker")


def test_lock_key_is_the_lock_not_its_spelling() -> None:
    a = lock_key(["Scikit_Learn==1.7.2", "numpy==2.0.0"])
    assert a == lock_key(["numpy==2.0.0", "scikit-learn==1.7.2"])
    assert a != lock_key(["numpy==2.0.0", "scikit-learn==1.8.0"])
    assert len(a) == 64 and int(a, 16) >= 0


def test_config_env_keys_global_per_model_and_command_line(tmp_path: Path) -> None:
    data = {"env": "server", "wheel_cache": "wheels", "models": {"a": {"env": "own", "max_batch_rows": 4}}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    config = ServeConfig.load(Settings(config=path))
    assert config.env_mode("a") == "own" and config.env_mode("b") == "server"
    assert config.policy("a").max_batch_rows == 4
    assert config.wheel_cache == tmp_path / "wheels"  # relative to the file
    # --env for all models beats the file's global key; the file's per-model key beats --env.
    cli = ServeConfig.load(Settings(config=path, pod_env="auto", wheel_cache=tmp_path / "other"))
    assert cli.env_mode("b") == "auto" and cli.env_mode("a") == "own"
    assert cli.wheel_cache == tmp_path / "other"
    assert ServeConfig.from_settings(Settings()).env_mode("x") == "auto"


@pytest.mark.parametrize("data, message", [
    ({"env": "conda"}, "config: env must be one of auto, own, server, got 'conda'"),
    ({"models": {"m": {"env": 1}}}, "config: models.m: env must be one of"),
    ({"wheel_cache": 3}, "wheel_cache must be a directory path"),
])
def test_bad_env_config_is_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        ServeConfig.from_settings(Settings(), data)


def test_serve_refuses_a_bad_env_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("models: {m: {env: sometimes}}\n")
    assert main(["--home", str(tmp_path / "h"), "serve", "m", "--config", str(path), "--port", "0"]) == 2
    assert "env must be one of auto, own, server" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "m", "--env", "sometimes"])
    assert exc.value.code == 2


def test_env_cli_on_an_empty_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = ["--home", str(tmp_path)]
    assert main([*home, "env", "list"]) == 0
    assert "no environments" in capsys.readouterr().out
    assert main([*home, "env", "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main([*home, "env", "rm"]) == 2
    assert "or give --all" in capsys.readouterr().err
    assert main([*home, "env", "rm", "nosuchpod"]) == 2
    assert "no environment has that key" in capsys.readouterr().err


def test_cache_keys_are_checked(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path)
    with pytest.raises(UsageError, match="not an environment key"):
        cache.get("../../etc")
    assert cache.get("0" * 64) is None and cache.list() == []


def test_the_registry_runs_an_own_env_pod_in_processes(
        store: Store, sklearn_model: tuple[Path, np.ndarray, object]) -> None:  # type: ignore[type-arg]
    path, sample, _ = sklearn_model
    pack(path, "churn", store, sample=sample)
    settings = Settings(home=store.home)
    plain = InferenceEngine(settings, ServeConfig.from_settings(settings)).add("churn")
    assert plain.env is not None and not plain.env.own and not plain.replica_policy.process
    config = ServeConfig.from_settings(settings, {"models": {"churn": {"env": "own"}}, "wheel_cache": "/srv/w"})
    own = InferenceEngine(settings, config).add("churn")
    assert own.env is not None and own.env.own and own.env.reason == "env: own"
    assert own.replica_policy.process  # another interpreter: processes are implied
    assert own.env.wheel_cache == Path("/srv/w") and own.env.key == lock_key(own.manifest.requirements)  # type: ignore[union-attr]
