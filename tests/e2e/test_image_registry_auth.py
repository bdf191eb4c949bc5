"""Registry auth against real registries: htpasswd (Basic) and token auth (Bearer, JWT signed here)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytestmark = pytest.mark.e2e
Kit = Any  # the ``kit`` fixture's class (tests/e2e/conftest.py)
USER, PASSWORD = "alice", "s3cret-pw"
SERVICE, ISSUER = "modelpod-test-registry", "modelpod-test-issuer"


@pytest.fixture
def cli(kit: Kit, capsys: pytest.CaptureFixture[str]) -> Any:
    return lambda home, *args: kit.cli(capsys, home, *args)


def _bcrypt(password: str) -> str:
    """A bcrypt hash for htpasswd, from libcrypt (through Python's crypt module) or htpasswd(1)."""
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbBC", "4", USER, password], capture_output=True, text=True, check=True)
        return out.stdout.strip().split(":", 1)[1]
    # Cost 4 (16 rounds): the registry checks the hash on every request; a test needs no more.
    code = "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, password], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 or not proc.stdout.startswith("$2"):
        pytest.skip("no bcrypt available (install apache2-utils for htpasswd)")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def basic_registry(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("basic-registry")
    (d / "htpasswd").write_text(f"{USER}:{_bcrypt(PASSWORD)}\n")
    proc, host = kit.start_registry(d, {"htpasswd": {"realm": "modelpod-test", "path": str(d / "htpasswd")}})
    try:
        yield host
    finally:
        kit.stop(proc)


def test_basic_auth(basic_registry: str, sk_pod: Any, cli: Any, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = f"{basic_registry}/pods/sk-lr"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    rc, _, err = cli(sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 2 and "needs a user name and password" in err
    monkeypatch.setenv("MODELPOD_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("MODELPOD_REGISTRY_PASSWORD", "wrong")
    rc, _, err = cli(sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 2 and "authentication failed" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("MODELPOD_REGISTRY_PASSWORD", PASSWORD)
    rc, pushed, err = cli(sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 0, err
    rc, pulled, err = cli(tmp_path / "fresh", "pull", f"{target}:1")
    assert rc == 0, err
    assert pulled["digest"] == sk_pod.record.digest


# -- token auth ---------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A token server as the distribution spec describes one: Basic credentials in, a JWT out."""

    def __init__(self, directory: Path) -> None:
        self.key, self.cert = directory / "key.pem", directory / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=modelpod-test-token"],
                       capture_output=True, check=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], capture_output=True,
                             check=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.issued: list[list[str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected or query.get("service") != [SERVICE]:
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = query.get("scope", [])
                service.issued.append(scopes)
                body = json.dumps({"token": service.token(scopes), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 60, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), capture_output=True, check=True).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def token_registry(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TokenService]]:
    if shutil.which("openssl") is None:
        kit.unavailable("openssl is needed to sign test tokens")
    d = tmp_path_factory.mktemp("token-registry")
    tokens = TokenService(d)
    auth = {"token": {"realm": tokens.url, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(tokens.cert)}}
    proc, host = kit.start_registry(d, auth)
    try:
        yield host, tokens
    finally:
        kit.stop(proc)
        tokens.close()


def test_bearer_token_auth(token_registry: tuple[str, TokenService], sk_pod: Any, cli: Any, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    host, tokens = token_registry
    target = f"{host}/team/pods/sk-lr"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    rc, _, err = cli(sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 2 and "token service" in err and "401" in err
    # Credentials from a docker login entry this time.
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "no-docker-config").mkdir()
    (tmp_path / "no-docker-config" / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    rc, pushed, err = cli(sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 0, err
    assert ["repository:team/pods/sk-lr:pull,push"] in tokens.issued
    rc, pulled, err = cli(tmp_path / "fresh", "pull", f"{target}@{pushed['digest']}")
    assert rc == 0, err
    assert pulled["digest"] == sk_pod.record.digest
