"""The fast read of flat JSON number lists gives exactly what the checked conversion gives.

``from_values`` packs a flat list of numbers with ``struct`` in C and checks afterwards; any
list it is not sure about goes to the checked path. Randomised lists of every numeric datatype
(floats, integers, booleans, strings, None, NaN, infinities, values at and beyond each type's
range, subnormals, ints beyond 2**53) must give the same array (dtype and values) or the same
error both ways.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelpod import inputs
from modelpod.errors import InvalidRequestError
from modelpod.inputs import from_values

NUMERIC = ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


def checked(datatype: str, data: list[Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(inputs, "_FLAT", {})  # the fast read off: the checked path only
        return outcome(datatype, data)


def outcome(datatype: str, data: list[Any]) -> Any:
    try:
        arr = from_values("x", datatype, data)
    except InvalidRequestError as exc:
        return ("error", str(exc))
    return ("ok", arr)


def same(a: Any, b: Any) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return bool(a[1] == b[1])
    x, y = a[1], b[1]
    return bool(x.dtype == y.dtype and x.shape == y.shape
                and np.array_equal(x.view(np.uint8), y.view(np.uint8)))  # bit for bit, NaN included


def special(rng: np.random.Generator, datatype: str) -> Any:
    """One value chosen to sit on an edge of ``datatype`` (or to be the wrong kind)."""
    dtype = np.dtype(inputs.DATATYPES[datatype])
    pool: list[Any] = [True, False, "1.5", None, [1.0], float("nan"), float("inf"), -float("inf"), 0, 1, -1,
                       2**53 + 1, -(2**53) - 1, 2**63, -(2**63) - 1, 2**64, 1e300, -1e300, 5e-324, 1e-40, 0.5, -0.0]
    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)
        pool += [top, -top, top * (1 + 2**-30), float(np.finfo(dtype).tiny), float(np.finfo(dtype).smallest_subnormal)]
    else:
        info = np.iinfo(dtype)
        pool += [int(info.max), int(info.min), int(info.max) + 1, int(info.min) - 1]
    return pool[rng.integers(len(pool))]


def random_list(rng: np.random.Generator, datatype: str) -> list[Any]:
    n = int(rng.integers(1, 3 * inputs.FLAT_SCAN))  # short lists (type scan) and long ones (numpy check)
    dtype = np.dtype(inputs.DATATYPES[datatype])
    if dtype.kind == "f":
        scale = 10.0 ** rng.integers(-8, 9)
        data: list[Any] = (rng.standard_normal(n) * scale).tolist()
        if rng.random() < 0.3:
            data = [round(v, int(rng.integers(0, 7))) for v in data]  # JSON as clients write it
        if rng.random() < 0.3:
            data[: n // 2] = rng.integers(-1000, 1000, n // 2).tolist()  # ints mixed in
    else:
        info = np.iinfo(dtype)
        low, high = max(int(info.min), -(2**62)), min(int(info.max), 2**62)
        data = rng.integers(low, high, n, endpoint=True).tolist()
    for _ in range(int(rng.integers(0, 3))):  # at most a couple of edge values
        data[int(rng.integers(n))] = special(rng, datatype)
    return data


@pytest.mark.parametrize("datatype", NUMERIC)
def test_the_fast_read_matches_the_checked_path(datatype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(sum(map(ord, datatype)))
    fast_taken = 0
    for _ in range(300):
        data = random_list(rng, datatype)
        want = checked(datatype, data, monkeypatch)
        got = outcome(datatype, data)
        assert same(got, want), (datatype, want, got)
        fast_taken += inputs.flat_numbers(datatype, data) is not None
    assert fast_taken > 50  # the comparison exercised the fast read, not only its refusals


@pytest.mark.parametrize(("datatype", "data", "reason"), [
    ("FP32", [1.0] * 200 + [True], "must be numbers"),
    ("FP32", [0.5] * 200 + ["1.5"], "must be numbers"),
    ("FP64", [0.5] * 200 + [None], "must be numbers"),
    ("INT32", [1] * 200 + [1.5], "must be integers"),
    ("INT8", [1] * 200 + [300], "does not fit datatype INT8"),
    ("UINT16", [1] * 200 + [-1], "does not fit datatype UINT16"),
    ("FP16", [1.0] * 200 + [1e6], "does not fit datatype FP16"),
    ("FP32", [1.0] * 200 + [1e300], "does not fit datatype FP32"),
])
def test_long_lists_with_one_bad_value_are_refused_as_before(datatype: str, data: list[Any], reason: str) -> None:
    with pytest.raises(InvalidRequestError, match=reason):
        from_values("x", datatype, data)


def test_nan_and_infinity_pass_through_the_fast_read() -> None:
    data = [0.25] * 200 + [float("nan")]
    arr = from_values("x", "FP32", data)
    assert arr.dtype == np.float32 and np.isnan(arr[-1]) and (arr[:-1] == 0.25).all()
    arr = from_values("x", "FP64", [1.5] * 200 + [float("inf")])
    assert arr.dtype == np.float64 and np.isinf(arr[-1])
