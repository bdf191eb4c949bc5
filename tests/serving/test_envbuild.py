"""Building own environments for real: offline from a wheel cache, once per lock, never half-made.

The cache holds a hand-made wheel (``mp-envtest``) beside real wheels (numpy and modelpod's runtime,
downloaded once per machine: ``tests/envwheels.py``), so each build is a real venv and a real pip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from envwheels import make_wheel, wheel_cache
from packaging.utils import canonicalize_name

import modelpod
from modelpod.serving.envbuild import RECORD, EnvBuildError, EnvCache, lock_key

pytestmark = [pytest.mark.pypi, pytest.mark.timeout(600)]
PINS = [f"numpy=={metadata.version('numpy')}", "mp-envtest==1.0"]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel cache: links to the shared real wheels, plus mp-envtest 1.0 (and no 2.0)."""
    shared = wheel_cache()
    here = tmp_path_factory.mktemp("wheels")
    for whl in shared.glob("*.whl"):
        (here / whl.name).symlink_to(whl)
    make_wheel(here, "mp_envtest", "1.0", "VALUE = 'one'\n")
    return here


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, wheels: Path) -> Iterator[tuple[EnvCache, Path]]:
    home = tmp_path_factory.mktemp("envhome")
    cache = EnvCache(home)
    env, made = cache.ensure(PINS, wheel_cache=wheels, imports=("mp_envtest",), what="test pod")
    assert made
    yield cache, env.path


def run_in(python: Path, code: str) -> str:
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_env_holds_exactly_the_pins_and_modelpod(built: tuple[EnvCache, Path]) -> None:
    cache, path = built
    assert path == cache.root / lock_key(PINS)
    env = cache.get(lock_key(PINS))
    assert env is not None
    out = run_in(env.python, "import json, sys, mp_envtest, numpy, modelpod, modelpod.pod\n"
                 "from importlib import metadata\n"
                 "print(json.dumps([mp_envtest.VALUE, numpy.__version__, modelpod.__version__, sys.prefix,"
                 " sorted(d.metadata['Name'].lower() for d in metadata.distributions())]))")
    value, numpy_version, modelpod_version, prefix, dists = json.loads(out)
    assert value == "one" and numpy_version == metadata.version("numpy")
    assert modelpod_version == modelpod.__version__
    assert Path(prefix) == path
    # modelpod's own code without the server's other packages: no scikit-learn, torch, pytest here.
    dists = {canonicalize_name(d) for d in dists}
    assert {"modelpod", "mp-envtest", "numpy", "pyyaml"} <= dists
    for absent in ("scikit-learn", "torch", "pytest", "skops"):
        assert absent not in dists
    record = json.loads((path / RECORD).read_text())
    assert record["pins"] == sorted(PINS, key=str.lower) and "offline" in record["source"]


def test_a_second_ensure_reuses_it(built: tuple[EnvCache, Path], wheels: Path) -> None:
    cache, path = built
    before = (path / RECORD).stat().st_mtime_ns
    env, made = cache.ensure(list(reversed(PINS)), wheel_cache=wheels)
    assert not made and env.path == path
    assert (path / RECORD).stat().st_mtime_ns == before
    assert [e.key for e in cache.list()] == [lock_key(PINS)]


def test_new_modelpod_code_refreshes_only_its_copy(built: tuple[EnvCache, Path], wheels: Path) -> None:
    cache, path = built
    record = json.loads((path / RECORD).read_text())
    (path / RECORD).write_text(json.dumps({**record, "code": "older"}))
    stale = next(path.glob("lib/python*/site-packages/modelpod")) / "stale.txt"
    stale.write_text("from an older modelpod")
    env, made = cache.ensure(PINS, wheel_cache=wheels)
    assert not made and env.record["code"] == record["code"] and env.record["created"] == record["created"]
    assert not stale.exists()
    assert run_in(env.python, "import mp_envtest, modelpod.pod; print(mp_envtest.VALUE)") == "one"


def test_a_pin_without_a_wheel_fails_naming_it_and_leaves_nothing(tmp_path: Path, wheels: Path) -> None:
    cache = EnvCache(tmp_path)
    pins = [PINS[0], "mp-envtest==2.0"]
    with pytest.raises(EnvBuildError) as exc:
        cache.ensure(pins, wheel_cache=wheels, what="model broken:1")
    message = str(exc.value)
    assert exc.value.package == "mp-envtest"
    assert "model broken:1" in message and "mp-envtest==2.0" in message and str(wheels) in message
    assert "repack" in message and "pip download" in message
    assert sorted(p.name for p in cache.root.iterdir()) == [".locks"]  # no staging, no env
    assert cache.get(lock_key(pins)) is None


def test_a_crashed_build_is_swept_and_never_trusted(tmp_path: Path, wheels: Path) -> None:
    cache = EnvCache(tmp_path)
    key = lock_key(PINS[1:])
    cache.root.mkdir(parents=True)
    leftover = cache.root / f".staging-{key}-12345-deadbeef"
    (leftover / "bin").mkdir(parents=True)
    half = cache.root / key  # a directory in the final place without a record: not ours to trust
    (half / "bin").mkdir(parents=True)
    assert cache.get(key) is None
    env, made = cache.ensure(PINS[1:], wheel_cache=wheels)
    assert made and env.path == half and (half / RECORD).is_file()
    assert not leftover.exists()
    assert cache.remove(key) and not half.exists() and cache.get(key) is None
    assert not cache.remove(key)


_RACE = """
import json, sys
from pathlib import Path
import modelpod
from modelpod.serving.envbuild import EnvCache
env, made = EnvCache(Path(sys.argv[1])).ensure(json.loads(sys.argv[2]), wheel_cache=Path(sys.argv[3]))
print(json.dumps({"made": made, "path": str(env.path)}))
"""


def test_two_processes_build_it_once(tmp_path: Path, wheels: Path) -> None:
    pins = ["mp-envtest==1.0"]
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), json.dumps(pins), str(wheels)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=500)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["made"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
