"""The server's end of a template: ``ForkedProcess`` and what is decided before a template starts.

A replica's pid arrives twice (the template's ``Forked``, the replica's ``Ready``): the two records
come on two sockets read by two threads (the loop, the template's reader), so either may be first;
the first wins, and a kill asked for before any pid was known is sent once, to that pid.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

from modelpod.serving.forking import MATH_THREADS, ForkedProcess, math_threads


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


def test_replicas_share_out_the_cores_to_their_math_libraries_unless_told() -> None:
    cores = len(os.sched_getaffinity(0))
    assert math_threads(1, {}) == {}  # one replica: the libraries' own defaults
    shared = math_threads(2, {})
    assert set(shared) == set(MATH_THREADS) and set(shared.values()) == {str(max(1, cores // 2))}
    assert set(math_threads(4 * cores, {}).values()) == {"1"}  # never none
    assert math_threads(2, {"OMP_NUM_THREADS": "3"}) == {}  # the user's (or the pod environment's) word wins
