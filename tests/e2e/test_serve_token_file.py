"""``--token-file`` / ``MODELPOD_TOKEN_FILE``: the token never shows in the process list."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from servutil import PYTHON, REPO, ServeProcess, modelpod_serve

from modelpod.store import PodRecord

pytestmark = pytest.mark.e2e
TOKEN = "tok-3f9c2d7e5b1a"


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def check_auth(server: ServeProcess) -> None:
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in cmdline
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v2/models/lr").status_code == 401
        assert c.get("/v2/models/lr", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/v2/health/live").status_code == 200


def test_token_file_flag(served_home: tuple[Path, PodRecord], tmp_path: Path) -> None:
    home, _ = served_home
    with modelpod_serve(home, "lr", "--no-grpc", "--token-file", str(token_file(tmp_path))) as server:
        check_auth(server)


def test_token_file_env(served_home: tuple[Path, PodRecord], tmp_path: Path) -> None:
    home, _ = served_home
    env = {"MODELPOD_TOKEN_FILE": str(token_file(tmp_path))}
    with modelpod_serve(home, "lr", "--no-grpc", env=env) as server:
        check_auth(server)


@pytest.mark.parametrize("make_args, fragment", [
    (lambda d: ["--token-file", str(d / "missing")], "cannot read"),
    (lambda d: ["--token-file", str(d / "empty")], "is empty"),
    (lambda d: ["--token-file", str(token_file(d)), "--token", "x"], "not both"),
])
def test_token_file_mistakes_are_usage_errors(served_home: tuple[Path, PodRecord], tmp_path: Path,
                                              make_args: object, fragment: str) -> None:
    home, _ = served_home
    (tmp_path / "empty").write_text("\n")
    args = make_args(tmp_path)  # type: ignore[operator]
    proc = subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(home), "serve", "lr", "--no-grpc",
                           "--port", "0", *args], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and TOKEN not in proc.stderr


def test_token_file_env_is_read_by_serve_only(served_home: tuple[Path, PodRecord], tmp_path: Path) -> None:
    home, _ = served_home

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(home), *args], capture_output=True,
                              text=True, cwd=REPO, timeout=120, check=False, env={**os.environ, **env})

    # Other commands do not care where the server's token lives.
    assert run("list", MODELPOD_TOKEN_FILE=str(tmp_path / "missing")).returncode == 0
    both = run("serve", "lr", "--no-grpc", "--port", "0", MODELPOD_TOKEN_FILE=str(token_file(tmp_path)),
               MODELPOD_TOKEN="x")
    assert both.returncode == 2 and "not both" in both.stderr
