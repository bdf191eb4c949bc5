"""``ForkedProcess``: a replica's pid arrives twice (the template's ``Forked``, the replica's ``Ready``).

The two records come on two sockets read by two threads, so either may be first; the first wins,
and a kill asked for before any pid was known is sent once, to that pid.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys

from modelpod.serving.forking import ForkedProcess


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_the_first_pid_wins_and_a_held_kill_is_sent_to_it_once() -> None:
    child = sleeper()
    try:
        proc = ForkedProcess(io.BytesIO())
        proc.kill()  # before any pid: held
        assert child.poll() is None
        proc.forked(child.pid)
        assert child.wait(30) == -signal.SIGKILL
        assert proc.pid == child.pid
    finally:
        child.kill()
        child.wait()


def test_a_second_report_changes_nothing() -> None:
    first, second = sleeper(), sleeper()
    try:
        proc = ForkedProcess(io.BytesIO())
        proc.forked(first.pid)
        proc.forked(second.pid)
        assert proc.pid == first.pid
        proc.kill()
        assert first.wait(30) == -signal.SIGKILL
        assert second.poll() is None
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
