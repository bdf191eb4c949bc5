"""A ``pull`` killed halfway leaves nothing in the store after the next store operation."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelpod.store import Store

pytestmark = pytest.mark.e2e

KILL_IN_ADD = (
    "import os, signal, sys\n"
    "from modelpod.cli import main\n"
    "from modelpod.store import Store\n"
    "def die(*a, **k):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "Store._record_new = die\n"
    "main(['--home', sys.argv[1], 'pull', sys.argv[2]])\n"
)


def test_a_killed_pull_leaves_nothing_behind(sk_pod: Any, oci_registry: Any, kit: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = oci_registry.repo("pods/killed:1")
    rc, _, err = kit.cli(capsys, sk_pod.home, "push", "sk-lr:1", target)
    assert rc == 0, err
    home = tmp_path / "home"
    Store(home)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_ADD, str(home), target], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list((home / "tmp").iterdir()) and list((home / "blobs" / "sha256").iterdir())
    rc, listed, err = kit.cli(capsys, home, "list")
    assert rc == 0 and listed == [], err
    assert [list((home / d).iterdir()) for d in ("tmp", "blobs/sha256", "pods")] == [[], [], []]
    rc, pulled, err = kit.cli(capsys, home, "pull", target)  # and the next pull works
    assert rc == 0 and pulled["version"] == 1, err
