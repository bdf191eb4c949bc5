"""The table pod in its image: built, run read-only under Docker, 500 rows equal to the pipeline's."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from tables import assert_table_answers, save_table_model, table_frame

from modelpod.cli import main
from modelpod.packing import pack
from modelpod.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def _docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 or not check, f"docker {args[0]}: {proc.stderr[-2000:]}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def table_image(tmp_path_factory: pytest.TempPathFactory, base_image: Any, kit: Any,
                docker_engine: bool) -> Iterator[tuple[str, Any]]:
    """The churn table pod (packed from its CSV) built as an image and loaded; (tag, pipeline)."""
    if not docker_engine:
        kit.unavailable("no Docker engine answers (docker version)")
    root = tmp_path_factory.mktemp("tabimg")
    d, pipe, _ = save_table_model(root / "m")
    home = root / "home"
    kit.shared_wheels(home)
    pack(d / "model.skops", "churn", Store(home), sample=d / "sample.csv", outputs=["label", "probabilities"])
    archive, tag = root / "image.tar", f"modelpod-test/churn:{uuid.uuid4().hex[:12]}"
    assert main(["--home", str(home), "build", "churn:1", "--base", base_image.oci,
                 "--output", f"docker-archive:{archive}", "--tag", tag]) == 0
    _docker("load", "-i", str(archive))
    try:
        yield tag, pipe
    finally:
        _docker("rmi", tag, check=False)


def test_the_image_answers_like_the_pipeline(table_image: tuple[str, Any], kit: Any) -> None:
    tag, pipe = table_image
    port = kit.free_port()
    cid = _docker("run", "-d", "--network", "host", "--read-only", "--user", "65532",
                  "--name", f"modelpod-tab-{uuid.uuid4().hex[:12]}", tag, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if not json.loads(_docker("inspect", cid))[0]["State"]["Running"]:
                raise AssertionError(f"the container exited: {_docker('logs', cid, check=False)[-3000:]}")
            return bool(kit.http_status(f"{url}/v2/health/ready") == 200)

        kit.wait_for(ready, 120, "the table image to be ready")
        assert_table_answers(url, "churn", pipe, table_frame(500, seed=13, unseen=True))
    finally:
        _docker("rm", "-f", cid, check=False)
