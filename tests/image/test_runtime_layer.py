"""The image's runtime layer holds exactly what a serving process imports (issue 9's dependency items)."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from servutil import ServeProcess

from modelpod.image.plan import GRPC, SERVING
from modelpod.image.wheels import Target
from modelpod.packing import pack
from modelpod.store import Store

REPO = Path(__file__).resolve().parents[2]
_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)\s*$")


def _roots(*groups: tuple[str, ...]) -> set[str]:
    env = {k: str(v) for k, v in default_environment().items()}
    reqs = [Requirement(r) for group in groups for r in group]
    return {canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate(env)}


def test_serving_roots_are_core_dependencies_and_uvicorn_is_gone() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert _roots(SERVING) <= core
    assert "uvicorn" not in core  # nothing imports it
    grpc_extra = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["grpc"]}
    assert _roots(GRPC) == grpc_extra


def _tops(dist: metadata.Distribution) -> set[str]:
    out = set()
    for f in dist.files or ():
        first = f.parts[0]
        if not first.endswith((".dist-info", ".data")) and first != "..":
            out.add(first.split(".")[0])
    return out


@pytest.mark.e2e
def test_a_server_on_the_runtime_layer_alone_imports_every_package_of_it(tmp_path: Path) -> None:
    """The runtime layer unpacked, a server started on it and nothing else (python -I -S): it serves
    REST and gRPC (the layer suffices), and it imports a module of every distribution the layer holds
    (nothing in it is dead weight: no rich, no uvicorn, no packaging)."""
    from modelpod.image.check import unpack
    from modelpod.image.plan import RUNTIME_DIR, runtime_layer
    from modelpod.image.progress import Silent

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec, pins = runtime_layer(Target(here), _wheel_cache(), Silent())
    runtime = unpack(spec, tmp_path / "trees") / RUNTIME_DIR
    code = tmp_path / "twice"
    code.mkdir()
    (code / "model.py").write_text(textwrap.dedent("""
        import modelpod

        class Twice(modelpod.Model):
            def predict(self, x: list[float]) -> list[float]:
                return [v * 2 for v in x]
    """))
    home = tmp_path / "home"
    pod = Store(home).open(pack(code, "twice", Store(home)).ref)
    boot = f"import sys; sys.path[:0] = [{str(runtime)!r}]; from modelpod.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-I", "-S", "-B", "-X", "importtime", "-c", boot, "serve", str(pod.path),
            "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--json"]
    with ServeProcess(argv, env={"MODELPOD_LOG_LEVEL": "warning"}) as server:
        body = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2], "data": [1.0, 2.0]}]}
        req = urllib.request.Request(f"{server.url}/v2/models/twice/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["outputs"][0]["data"] == [2.0, 4.0]
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as resp:
            assert resp.status == 200
        assert server.grpc is not None  # gRPC served from the layer's grpcio
    tops = {m.group(2).partition(".")[0] for line in server.stderr if (m := _LINE.match(line.rstrip("\n")))}
    by_top: dict[str, str] = {}
    for dist in metadata.distributions(path=[str(runtime)]):
        for top in _tops(dist):
            by_top[top] = canonicalize_name(dist.metadata["Name"])
    imported = {by_top[t] for t in tops if t in by_top} - {"modelpod"}
    assert imported == {p.name for p in pins}
    assert not imported & {"rich", "uvicorn", "packaging"}


def _wheel_cache() -> Path:
    """The wheel cache the image tests share (tests/e2e/conftest.py), so nothing downloads twice."""
    cache = Path(os.environ.get("MODELPOD_TEST_CACHE") or Path.home() / ".cache" / "modelpod-tests") / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@pytest.mark.parametrize("grpc", [True, False])
def test_runtime_layer_title_says_whether_grpc_is_in(grpc: bool, tmp_path: Path) -> None:
    from modelpod.image.plan import runtime_layer
    from modelpod.image.progress import Silent

    spec, pins = runtime_layer(Target("3.11"), tmp_path / "wheels", Silent(), grpc=grpc)
    assert ("gRPC" in spec.title) is grpc
    assert ("grpcio" in {p.name for p in pins}) is grpc
