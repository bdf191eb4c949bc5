"""Stepwise parsing of big bodies gives exactly what one orjson parse gives, or refuses."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpod.errors import InvalidRequestError
from modelpod.protocols import bigjson

# Strings full of what a scanner could trip on: quotes, backslashes, brackets, commas, colons.
TEXT = st.text(alphabet='ab"\\[]{},: é\u2028', max_size=6)
SCALAR = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                   TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=30)
TENSOR = st.fixed_dictionaries({"name": TEXT, "datatype": st.just("FP32"), "shape": st.just([2]),
                                "data": st.lists(VALUE, max_size=40)})
BODY = st.fixed_dictionaries({"inputs": st.lists(TENSOR, min_size=1, max_size=3)},
                             optional={"id": TEXT, "outputs": st.lists(st.fixed_dictionaries({"name": TEXT}),
                                                                       max_size=2),
                                       "parameters": st.dictionaries(TEXT, VALUE, max_size=2)})


@pytest.fixture(autouse=True)
def tiny_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Steps of a few bytes, so every boundary case (escapes across scan steps, cuts in every array) occurs.
    monkeypatch.setattr(bigjson, "STEP", 16)
    monkeypatch.setattr(bigjson, "SCAN", 7)


@settings(max_examples=300, deadline=None)
@given(BODY, st.sampled_from([None, 1]), st.data())
def test_same_as_one_parse_or_refused(body: dict[str, Any], indent: int | None, data: st.DataObject) -> None:
    raw = json.dumps(body, indent=indent).encode() if indent else orjson.dumps(body)
    assert bigjson.loads(raw, 10**6, 1000) == orjson.loads(raw)
    cut = raw[:data.draw(st.integers(1, len(raw) - 1))]
    try:
        orjson.loads(cut)
    except orjson.JSONDecodeError:
        with pytest.raises(InvalidRequestError):
            bigjson.loads(cut, 10**6, 1000)


def test_objects_and_depth_are_capped_before_parsing() -> None:
    many = orjson.dumps({"inputs": [{"name": f"x{i}", "data": [1]} for i in range(100)]})
    with pytest.raises(InvalidRequestError, match="more than 50 JSON objects"):
        bigjson.loads(many, 50, 64)
    deep = b'{"inputs": [{"data": ' + b"[" * 70 + b"]" * 70 + b"}]}"
    with pytest.raises(InvalidRequestError, match="deeper than 64"):
        bigjson.loads(deep, 100, 64)


def test_nan_and_infinity_in_pieces() -> None:
    raw = b'{"inputs": [{"name": "x", "data": [' + b"1.5, NaN, -Infinity, " * 10 + b"2]}]}"
    data = bigjson.loads(raw, 10, 64)["inputs"][0]["data"]
    assert len(data) == 31 and data[1] != data[1] and data[2] == float("-inf")


def test_the_bracket_count_agrees_with_a_plain_count_on_short_and_long_bodies() -> None:
    from modelpod.protocols.bigjson import more_brackets

    rng = random.Random(7)
    for size in (0, 1, 50, 300, 2048, 2049, 9000):
        for _ in range(20):
            data = bytes(rng.choice(b'[]{}"a1,: ') for _ in range(size))
            n = data.count(b"[") + data.count(b"{")
            for limit in (0, n - 1, n, n + 1, 64):
                assert more_brackets(data, limit) == (n > limit), (size, limit)
