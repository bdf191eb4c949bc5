"""The built image under Docker: loaded, run read-only as a non-root user, serving OIP v2."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)


def docker(*args: str, timeout: float = 300, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def loaded(sk_pod: Any, base_image: Any, kit: Kit, tmp_path_factory: pytest.TempPathFactory,
           docker_engine: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """The sk-lr image built as a docker archive and loaded; (tag, build output). Untagged at the end."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")
    from modelpod.cli import main

    archive = tmp_path_factory.mktemp("archive") / "image.tar"
    tag = f"modelpod-test/sk-lr:{uuid.uuid4().hex[:12]}"
    out = tmp_path_factory.mktemp("out") / "build.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--home", str(sk_pod.home), "build", "sk-lr:1", "--base", base_image.oci,
                   "--output", f"docker-archive:{archive}", "--tag", tag, "--json"])
    assert rc == 0
    data = json.loads(buf.getvalue())
    out.write_text(buf.getvalue())
    assert f"Loaded image: {tag}" in docker("load", "-i", str(archive))
    try:
        yield tag, data
    finally:
        # Only our tag goes: the image itself stays while another tag (another session) holds it.
        docker("rmi", tag, check=False)


@pytest.fixture
def container(loaded: tuple[str, dict[str, Any]], kit: Kit) -> Iterator[tuple[str, int]]:
    tag, _ = loaded
    port = kit.free_port()
    # Arguments after the image name go to `modelpod serve` (the entrypoint; CMD is empty).
    cid = docker("run", "-d", "--network", "host", "--read-only", "--user", "65532",
                 "--name", f"modelpod-test-{uuid.uuid4().hex[:12]}", tag, "--port", str(port))
    try:
        yield cid, port
    finally:
        docker("rm", "-f", cid, check=False)


def test_loaded_image_config(loaded: tuple[str, dict[str, Any]]) -> None:
    tag, data = loaded
    info = json.loads(docker("image", "inspect", tag))[0]
    assert info["Id"] == data["config"]
    config = info["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"][1:] == ["-m", "modelpod.entry", "/opt/modelpod/pod"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Labels"]["dev.modelpod.digest"] == data["pod_digest"]


def test_read_only_container_serves_what_predict_says(container: tuple[str, int], sk_pod: Any, kit: Kit,
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cid, port = container
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        state = json.loads(docker("inspect", cid))[0]["State"]
        if not state["Running"]:
            raise AssertionError(f"the container exited ({state['ExitCode']}): {docker('logs', cid)[-3000:]}")
        return bool(kit.http_status(f"{base}/v2/health/ready") == 200)

    try:
        kit.wait_for(ready, 90, "the container to be ready")
    except TimeoutError:
        raise AssertionError(f"not ready; logs: {docker('logs', cid, check=False)[-3000:]}") from None

    spec = sk_pod.record.manifest.signature.inputs[0]
    sample = sk_pod.sample
    request = {"inputs": [{"name": spec.name, "shape": list(sample.shape), "datatype": spec.datatype,
                           "data": sample.ravel().tolist()}]}
    req = urllib.request.Request(f"{base}/v2/models/sk-lr/infer", data=json.dumps(request).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        served = json.loads(resp.read())

    (tmp_path / "req.json").write_text(json.dumps(request))
    rc, local, err = kit.cli(capsys, sk_pod.home, "predict", "sk-lr:1", "--input", str(tmp_path / "req.json"))
    assert rc == 0, err
    assert [(o["name"], o["datatype"], o["shape"], o["data"]) for o in served["outputs"]] == \
        [(o["name"], o["datatype"], o["shape"], o["data"]) for o in local["outputs"]]

    # The image's own healthcheck command passes inside the read-only container.
    health = json.loads(docker("inspect", cid))[0]["Config"]["Healthcheck"]["Test"][1:]
    docker("exec", "-e", f"MODELPOD_PORT={port}", cid, *health)
