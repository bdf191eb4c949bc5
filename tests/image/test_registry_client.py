"""References, auth challenges and credentials: parsed the way docker and the registries mean them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from modelpod.errors import UsageError
from modelpod.image.base import default_base
from modelpod.image.cli import credentials_for
from modelpod.image.registry import Credentials, Reference, is_loopback, merge_scopes, parse_challenge


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "host"),
    [
        ("python:3.11-slim", "docker.io", "library/python", "3.11-slim", None, "registry-1.docker.io"),
        ("python", "docker.io", "library/python", None, None, "registry-1.docker.io"),
        ("me/app:v1", "docker.io", "me/app", "v1", None, "registry-1.docker.io"),
        ("ghcr.io/o/r/m:1", "ghcr.io", "o/r/m", "1", None, "ghcr.io"),
        ("127.0.0.1:5000/pods/x", "127.0.0.1:5000", "pods/x", None, None, "127.0.0.1:5000"),
        ("localhost/x:t", "localhost", "x", "t", None, "localhost"),
        ("[::1]:5000/x@sha256:" + "a" * 64, "[::1]:5000", "x", None, "sha256:" + "a" * 64, "[::1]:5000"),
    ],
)
def test_references(text: str, registry: str, repository: str, tag: str | None, digest: str | None,
                    host: str) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.host) == (registry, repository, tag, digest, host)
    assert ref.reference == (digest or tag or "latest")


@pytest.mark.parametrize("text", ["UPPER/case", "x@sha256:short", "x:bad tag", "a//b", "x:"])
def test_bad_references(text: str) -> None:
    with pytest.raises(UsageError):
        Reference.parse(text)


def test_loopback_only_for_plain_http() -> None:
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5000")
    assert not is_loopback("registry.example.com") and not is_loopback("10.0.0.1:5000")


def test_challenges() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/python:pull"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/python:pull"}
    assert parse_challenge('Basic realm="test"') == ("basic", {"realm": "test"})


def test_credentials_from_env_then_docker_config(tmp_path: Path) -> None:
    env = {"MODELPOD_REGISTRY_USERNAME": "alice", "MODELPOD_REGISTRY_PASSWORD": "pw"}
    assert credentials_for("r.example", env) == Credentials("alice", "pw")
    auth = base64.b64encode(b"bob:secret").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": auth}, "127.0.0.1:5000": {"auth": auth}}}))
    env = {"DOCKER_CONFIG": str(tmp_path)}
    assert credentials_for("docker.io", env) == Credentials("bob", "secret")
    assert credentials_for("127.0.0.1:5000", env) == Credentials("bob", "secret")
    assert credentials_for("other.example", env) is None
    assert "secret" not in repr(Credentials("bob", "secret"))


def test_scopes_merge_per_repository() -> None:
    assert merge_scopes(["repository:a/b:push,pull", "repository:a/b:pull", "repository:c:pull", ""]) == [
        "repository:a/b:pull,push", "repository:c:pull"]


def test_default_base_follows_the_pods_python() -> None:
    assert default_base("3.11") == "python:3.11-slim"
    ref = Reference.parse(default_base("3.12"))
    assert (ref.host, ref.repository, ref.tag) == ("registry-1.docker.io", "library/python", "3.12-slim")
