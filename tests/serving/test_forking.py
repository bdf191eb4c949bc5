"""What the server's end of a template decides before it starts one (no processes here)."""

from __future__ import annotations

import os

from modelpod.serving.forking import MATH_THREADS, math_threads


def test_replicas_share_out_the_cores_to_their_math_libraries_unless_told() -> None:
    cores = len(os.sched_getaffinity(0))
    assert math_threads(1, {}) == {}  # one replica: the libraries' own defaults
    shared = math_threads(2, {})
    assert set(shared) == set(MATH_THREADS) and set(shared.values()) == {str(max(1, cores // 2))}
    assert set(math_threads(4 * cores, {}).values()) == {"1"}  # never none
    assert math_threads(2, {"OMP_NUM_THREADS": "3"}) == {}  # the user's (or the pod environment's) word wins
