"""The official OIP REST spec, fuzzed with schemathesis against a real ``modelpod serve``.

Every answer must be free of server errors (5xx) and valid against the spec wherever the spec
documents that status (the OIP spec lists only 200/400, so 404s for made-up model names are checked
for content type and body, not flagged for their status). One run lets path parameters vary; one
pins them to the served model so the infer validation itself is fuzzed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from servutil import ServeProcess, modelpod_serve

from modelpod.store import PodRecord

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import checks  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

pytestmark = pytest.mark.e2e


def spec_path() -> Path:
    """The shared spec next to the repository when there is one, else the copy in tests/specs."""
    shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "specs" / "open_inference_rest.yaml"
    return shared if shared.is_file() else Path(__file__).resolve().parents[1] / "specs" / "open_inference_rest.yaml"


CHECKS = [checks.not_a_server_error, checks.response_schema_conformance, checks.content_type_conformance,
          checks.response_headers_conformance]
free = schemathesis.openapi.from_path(spec_path())
pinned = schemathesis.openapi.from_path(spec_path(), config=SchemathesisConfig.from_dict(
    {"parameters": {"path.MODEL_NAME": "lr", "path.MODEL_VERSION": "1"}}))
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(served_home: tuple[Path, PodRecord]) -> Iterator[ServeProcess]:
    home, _ = served_home
    with modelpod_serve(home, "lr", "--no-grpc") as proc:
        yield proc


@free.parametrize()
@FUZZ
def test_any_names(case: Any, server: ServeProcess) -> None:
    case.call_and_validate(base_url=server.url, checks=CHECKS)


@pinned.parametrize()
@FUZZ
def test_served_model(case: Any, server: ServeProcess) -> None:
    case.call_and_validate(base_url=server.url, checks=CHECKS)


def test_server_survived(server: ServeProcess) -> None:
    import httpx

    assert httpx.get(server.url + "/v2/health/ready", timeout=30).status_code == 200
    assert not [line for line in server.stderr if '"level":"error"' in line]
