"""The built image serving over TLS from ``MODELPOD_TLS_*`` (a Secret mount in Kubernetes), its own
healthcheck speaking HTTPS, and a scoped token file read from the environment too."""

from __future__ import annotations

import contextlib
import io
import json
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tlsutil import Certs, make_certs

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)
TOKEN = "img-token-7d3a9e"


@pytest.fixture(scope="module")
def image(sk_pod: Any, base_image: Any, kit: Kit, tmp_path_factory: pytest.TempPathFactory,
          docker_engine: bool) -> Iterator[str]:
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")
    from modelpod.cli import main

    archive = tmp_path_factory.mktemp("tls-archive") / "image.tar"
    tag = f"modelpod-test-tls/sk-lr:{uuid.uuid4().hex[:12]}"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--home", str(sk_pod.home), "build", "sk-lr:1", "--base", base_image.oci, "--no-grpc",
                   "--output", f"docker-archive:{archive}", "--tag", tag, "--json"])
    assert rc == 0
    assert f"Loaded image: {tag}" in kit.docker("load", "-i", str(archive))
    try:
        yield tag
    finally:
        kit.docker("rmi", tag, check=False)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Certs, Path]:
    """Certificates and a token table in one directory the container's user (65532) can read."""
    certs = make_certs(tmp_path_factory.mktemp("tls-mount"))
    (certs.dir / "tokens.yaml").write_text(f"tokens:\n  - name: app\n    token: {TOKEN}\n    scopes: [infer, read]\n")
    certs.dir.chmod(0o755)
    for path in certs.dir.iterdir():
        path.chmod(0o644)  # a test key: in a cluster the Secret mount's mode and fsGroup do this
    return certs, certs.dir


def test_image_serves_https_from_the_environment(image: str, mounted: tuple[Certs, Path], kit: Kit) -> None:
    certs, folder = mounted
    port = kit.free_port()
    cid = kit.docker("run", "-d", "--network", "host", "--read-only", "--user", "65532",
                     "--name", f"modelpod-test-tls-{uuid.uuid4().hex[:12]}", "-v", f"{folder}:/tls:ro",
                     "-e", "MODELPOD_TLS_CERT=/tls/server.pem", "-e", "MODELPOD_TLS_KEY=/tls/server.key",
                     "-e", "MODELPOD_TLS_CLIENT_CA=/tls/ca.pem", "-e", "MODELPOD_TOKEN_FILE=/tls/tokens.yaml",
                     image, "--port", str(port))
    try:
        ctx = certs.client_context()
        base = f"https://127.0.0.1:{port}"

        def ready() -> bool:
            state = json.loads(kit.docker("inspect", cid))[0]["State"]
            if not state["Running"]:
                raise AssertionError(f"the container exited: {kit.docker('logs', cid, check=False)[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", context=ctx, timeout=5) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        kit.wait_for(ready, 90, "the TLS container to be ready")
        req = urllib.request.Request(f"{base}/v2/models/sk-lr", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            assert json.loads(r.read())["name"] == "sk-lr"
        with pytest.raises(urllib.error.HTTPError) as info:  # no client certificate: health only
            urllib.request.urlopen(req, context=certs.client_context(cert=False), timeout=30)
        assert info.value.code == 401 and "client certificate" in json.loads(info.value.read())["error"]
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # plain HTTP: a 400
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=30)
        # The image's own healthcheck (no certificate: health is open) passes over HTTPS.
        health = json.loads(kit.docker("inspect", cid))[0]["Config"]["Healthcheck"]["Test"][1:]
        kit.docker("exec", "-e", f"MODELPOD_PORT={port}", cid, *health)
        logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True, timeout=60, check=False)
        assert "bearer tokens required" in logs.stderr or "serving" in logs.stderr + logs.stdout
        assert TOKEN not in logs.stdout + logs.stderr
    finally:
        kit.docker("rm", "-f", cid, check=False)
