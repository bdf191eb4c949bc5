"""Images that run as documented (issue 10): the build-time load check, read-only, healthy with --port,
gRPC by default (--no-grpc to leave it out), the store's version and aliases, the pack time."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from podcode import LAZY_IMPORT, code_dir

from modelpod.image.builder import iso
from modelpod.packing import pack
from modelpod.store import Store

pytestmark = pytest.mark.e2e
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)

# Loading writes and reads a temporary file, as torch.export's loader does; the answer depends on it.
_SCRATCH = """
    import tempfile
    from pathlib import Path

    import modelpod

    class Scratch(modelpod.Model):
        def load(self) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "w").write_text("3")
                self.k = float((Path(tmp) / "w").read_text())
            super().load()

        def predict(self, x: list[float]) -> list[float]:
            return [v * self.k for v in x]
"""
@pytest.fixture
def build(kit: Kit, capsys: pytest.CaptureFixture[str]) -> Any:
    return lambda home, *args: kit.cli(capsys, home, "build", *args)


# -- the load check (no Docker needed) --------------------------------------------------------------
def test_build_refuses_an_image_that_would_miss_a_module(tmp_path: Path, base_image: Any, build: Any,
                                                         kit: Kit) -> None:
    home = tmp_path / "home"
    kit.shared_wheels(home)
    code = code_dir(tmp_path / "lazy", LAZY_IMPORT)
    bare = pack(code, "lazy", Store(home), auto_lock=False)  # nothing locked: the image lacks threadpoolctl
    assert bare.manifest.requirements == ()
    rc, _, err = build(home, "lazy:1", "--base", base_image.oci, "--output", f"oci:{tmp_path / 'never'}")
    assert rc == 2
    assert "would fail at its first request" in err and "'threadpoolctl'" in err and "--requirements" in err
    assert not (tmp_path / "never").exists()  # refused before anything was written
    # --no-check builds it anyway, and says so
    rc, data, err = build(home, "lazy:1", "--base", base_image.oci, "--output", f"oci:{tmp_path / 'forced'}",
                          "--no-check")
    assert rc == 0, err
    assert data["load_check"].startswith("off")
    # the automatic lock finds the import, and the same code builds with the check passing
    assert "threadpoolctl" in " ".join(pack(code, "lazy", Store(home)).manifest.requirements)
    rc, data, err = build(home, "lazy:2", "--base", base_image.oci, "--output", f"oci:{tmp_path / 'ok'}")
    assert rc == 0, err
    assert data["load_check"] == "passed"


def test_no_grpc_builds_a_slimmer_rest_only_image(tmp_path: Path, base_image: Any, build: Any, kit: Kit) -> None:
    home = tmp_path / "home"
    kit.shared_wheels(home)
    pack(code_dir(tmp_path / "scratch", _SCRATCH), "scratch", Store(home))
    sizes = {}
    for flags in ((), ("--no-grpc",)):
        out = tmp_path / f"img{len(flags)}"
        rc, data, err = build(home, "scratch:1", "--base", base_image.oci, "--output", f"oci:{out}:t", *flags)
        assert rc == 0, err
        config = json.loads(kit.run("skopeo", "inspect", "--config", f"oci:{out}:t"))["config"]
        runtime = next(layer for layer in data["layers"] if layer["role"] == "runtime")
        sizes[bool(flags)] = runtime["size"]
        assert ("gRPC" in runtime["title"]) is not bool(flags)
        assert set(config["ExposedPorts"]) == ({"8080/tcp"} if flags else {"8080/tcp", "8081/tcp"})
    assert sizes[True] < sizes[False]


# -- under Docker -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch_image(tmp_path_factory: pytest.TempPathFactory, base_image: Any, kit: Kit,
                  docker_engine: bool) -> Iterator[tuple[str, Store, Any]]:
    """scratch:1 and scratch:2 (alias production); the image of scratch:2 loaded; (tag, store, record)."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")
    from modelpod.cli import main

    root = tmp_path_factory.mktemp("scratch")
    home = root / "home"
    kit.shared_wheels(home)
    store = Store(home)
    code = code_dir(root / "scratch", _SCRATCH)
    pack(code, "scratch", store)
    rec = pack(code, "scratch", store)
    store.tag("scratch", rec.version, "production")
    tag = f"modelpod-test/scratch:{uuid.uuid4().hex[:12]}"
    archive = root / "image.tar"
    rc = main(["--home", str(home), "build", "scratch@production", "--base", base_image.oci,
               "--output", f"docker-archive:{archive}", "--tag", tag, "--json"])
    assert rc == 0
    kit.docker("load", "-i", str(archive))
    try:
        yield tag, store, store.get("scratch:2")
    finally:
        kit.docker("rmi", tag, check=False)


@pytest.mark.docker
def test_image_runs_read_only_healthy_on_its_port_with_grpc_and_versions(
        scratch_image: tuple[str, Store, Any], kit: Kit) -> None:
    tag, _, rec = scratch_image
    # As the docs say: read-only, the image's own user, the server's port given after the image name.
    # Only the health interval is shortened, so the test need not wait 30 s for the first probe.
    cid = kit.docker("run", "-d", "--read-only", "--health-interval", "2s", "-p", "127.0.0.1::9000",
                     "-p", "127.0.0.1::8081", "--name", f"modelpod-test-{uuid.uuid4().hex[:12]}", tag,
                     "--port", "9000")
    try:
        def healthy() -> bool:
            state = json.loads(kit.docker("inspect", cid))[0]["State"]
            return bool(state.get("Health", {}).get("Status") == "healthy")

        kit.wait_container(cid, healthy, 180, "the container to be healthy")
        base = f"http://127.0.0.1:{kit.published(cid, 9000)}"
        with urllib.request.urlopen(f"{base}/v2/models/scratch", timeout=30) as resp:
            meta = json.loads(resp.read())
        assert meta["versions"] == ["2"]  # as in the store
        assert kit.http_status(f"{base}/v2/models/scratch/versions/production/ready") == 200
        body = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2], "data": [1.0, 2.0]}]}
        req = urllib.request.Request(f"{base}/v2/models/scratch/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer["model_version"] == "2"
        assert answer["outputs"][0]["data"] == [3.0, 6.0]  # the factor load() read back from /tmp

        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{kit.published(cid, 8081)}")
        try:
            assert client.is_server_ready()
            x = grpcclient.InferInput("x", [2], "FP64")  # list[float]: Python floats are 64-bit
            x.set_data_from_numpy(np.array([1.0, 4.0], np.float64))
            result = client.infer("scratch", [x])
            np.testing.assert_array_equal(result.as_numpy("output-0"), np.array([3.0, 12.0]))
            assert result.get_response().model_version == "2"
        finally:
            client.close()
    finally:
        kit.docker("rm", "-f", cid, check=False)


@pytest.mark.docker
def test_image_time_is_the_pack_time(scratch_image: tuple[str, Store, Any], kit: Kit) -> None:
    tag, _, rec = scratch_image
    created = json.loads(kit.docker("image", "inspect", tag))[0]["Created"]
    assert created.startswith(iso(rec.manifest.lineage["created"])[:19])
    assert not created.startswith("1970")


@pytest.mark.docker
@pytest.mark.timeout(1500)  # a 270 MB image: torch's wheel is unpacked, checked, compressed and loaded
def test_torch_export_pod_loads_under_read_only(tmp_path: Path, base_image: Any, kit: Kit,
                                                docker_engine: bool) -> None:
    """torch.export's loader needs a temporary directory: ``docker run --read-only`` with no extra flags."""
    import torch

    from modelpod.cli import main

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    program = torch.export.export(net, (torch.from_numpy(x),),
                                  dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(tmp_path / "program.pt2"))
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    home = tmp_path / "home"
    kit.shared_wheels(home)
    pack(tmp_path / "program.pt2", "mlp", Store(home))
    tag = f"modelpod-test/mlp:{uuid.uuid4().hex[:12]}"
    archive = tmp_path / "image.tar"
    assert main(["--home", str(home), "build", "mlp:1", "--base", base_image.oci,
                 "--output", f"docker-archive:{archive}", "--tag", tag, "--json"]) == 0
    kit.docker("load", "-i", str(archive), timeout=900)
    cid = ""
    try:
        cid = kit.docker("run", "-d", "--read-only", "-p", "127.0.0.1::8080", "--name",
                     f"modelpod-test-{uuid.uuid4().hex[:12]}", tag)
        base = f"http://127.0.0.1:{kit.published(cid, 8080)}"

        kit.wait_container(cid, lambda: kit.http_status(f"{base}/v2/models/mlp/ready") == 200, 240,
                           "the torch.export pod to load")
        with urllib.request.urlopen(f"{base}/v2/models/mlp", timeout=30) as resp:
            name = json.loads(resp.read())["inputs"][0]["name"]
        body = {"inputs": [{"name": name, "datatype": "FP32", "shape": [5, 4], "data": x.ravel().tolist()}]}
        req = urllib.request.Request(f"{base}/v2/models/mlp/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), expected,
                                   rtol=1e-5, atol=1e-6)
    finally:
        if cid:
            kit.docker("rm", "-f", cid, check=False)
        kit.docker("rmi", tag, check=False)
