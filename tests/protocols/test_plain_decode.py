"""The plain-request decoder (codec.decode_plain) against the general one (codec.decode_request).

For every body, random or mutated: when the plain decoder answers, the general decoder answers the
same (the same arrays bit for bit, dtypes, shapes, id, parameters, outputs); when the general one
refuses, the plain one has declined. And it does answer the plain bodies it is for.
"""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import numpy as np
import pytest

from modelpod.errors import InvalidRequestError
from modelpod.inputs import InputCheck
from modelpod.pod import DATATYPES, Signature, TensorSpec
from modelpod.protocols.codec import decode_plain, decode_request
from modelpod.table import TableCheck

NUMERIC = ["FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]


def _values(rng: random.Random, datatype: str, n: int) -> list[Any]:
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)  # beyond it the value does not fit (both decoders refuse)
        specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 5e-324, top, -top, -1e-45]
        return [rng.choice(specials) if rng.random() < 0.15 else max(-top, min(top, rng.uniform(-1e4, 1e4)
                * 10 ** rng.randint(-8, 2))) for _ in range(n)]
    info = np.iinfo(dtype)
    edges = [int(info.min), int(info.max), 0, 1]
    return [rng.choice(edges) if rng.random() < 0.2 else rng.randint(int(info.min), int(info.max)) for _ in range(n)]


def _signature(rng: random.Random) -> Signature:
    specs = []
    for i in range(rng.randint(1, 3)):
        rank = rng.randint(1, 3)
        shape = tuple([-1] + [rng.choice([-1, rng.randint(1, 5)]) for _ in range(rank - 1)])
        specs.append(TensorSpec(f"in{i}", rng.choice(NUMERIC), shape))
    return Signature(tuple(specs), (TensorSpec("out", "FP32", (-1,)),))


def _body(rng: random.Random, sig: Signature) -> dict[str, Any]:
    inputs = []
    rows = rng.randint(1, 6)
    for spec in sig.inputs:
        shape = [rows] + [d if d != -1 else rng.randint(1, 4) for d in spec.shape[1:]]
        n = math.prod(shape)
        inputs.append({"name": spec.name, "datatype": spec.datatype, "shape": shape,
                       "data": _values(rng, spec.datatype, n)})
    rng.shuffle(inputs)
    body: dict[str, Any] = {"inputs": [dict(rng.sample(sorted(t.items()), len(t))) for t in inputs]}
    if rng.random() < 0.3:
        body["id"] = f"r{rng.randint(0, 99)}"
    return body


def _mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    t = rng.choice(body["inputs"])
    kind = rng.randrange(18)
    if kind == 0:
        t["data"][rng.randrange(len(t["data"]))] = rng.choice([True, False])
    elif kind == 1:
        t["data"][rng.randrange(len(t["data"]))] = "1.5"
    elif kind == 2:
        t["data"].append(1)
    elif kind == 3:
        t["shape"][0] = 0
    elif kind == 4:
        t["parameters"] = {}
    elif kind == 5:
        t["datatype"] = rng.choice(NUMERIC + ["BYTES", "BOOL", "fp32"])
    elif kind == 6:
        t["data"][rng.randrange(len(t["data"]))] = rng.choice([1e300, -1e300, 2 ** 64, -(2 ** 63) - 1, 300, -1, 0.5])
    elif kind == 7:
        t["data"] = [t["data"]]
    elif kind == 8:
        body["id"] = 7
    elif kind == 9:
        body["parameters"] = {"binary_data_output": False}
    elif kind == 10:
        body["outputs"] = [{"name": "out"}]
    elif kind == 11:
        body["inputs"].append(copy.deepcopy(t))
    elif kind == 12:
        body["inputs"].remove(t)
    elif kind == 13:
        t["shape"] = t["shape"] + [1]
    elif kind == 14:
        t["shape"][rng.randrange(len(t["shape"]))] = rng.choice([True, 1.0, -2, "3"])
    elif kind == 15:
        t["name"] = rng.choice(["nope", "", 3])
    elif kind == 16:  # the same element count in other dimensions: a fixed one may no longer match
        t["shape"] = t["shape"][::-1] if len(t["shape"]) > 1 else [1, t["shape"][0]]
    else:
        t["data"] = [float(v) if isinstance(v, int) else v for v in t["data"]]
    return body


def _same(plain: Any, general: Any) -> None:
    assert plain.inputs.keys() == general.inputs.keys()
    for name, arr in plain.inputs.items():
        other = general.inputs[name]
        assert arr.dtype == other.dtype and arr.shape == other.shape, name
        assert arr.tobytes() == other.tobytes(), name
    assert (plain.id, dict(plain.parameters), plain.outputs, plain.binary_output, plain.checked) == (
        general.id, dict(general.parameters), general.outputs, general.binary_output, general.checked)


def _compare(obj: Any, check: InputCheck, tail: bytes | None = None) -> bool:
    """Both decoders on one body (as orjson would parse it) and its binary tail, if any; whether the
    plain one answered."""
    view = memoryview(tail) if tail is not None else None
    plain = decode_plain(obj, check, view)
    try:
        general = decode_request(copy.deepcopy(obj), view, check)
    except InvalidRequestError:
        assert plain is None, f"the plain decoder took a body the general one refuses: {obj}"
        return False
    if plain is not None:
        _same(plain, general)
    return plain is not None


@pytest.mark.parametrize("seed", range(8))
def test_the_plain_decoder_answers_as_the_general_one(seed: int) -> None:
    rng = random.Random(seed)
    taken = declined = 0
    for _ in range(60):
        sig = _signature(rng)
        for nonfinite in ("pass", "reject"):
            check = InputCheck(sig, "m", nonfinite)
            body = _body(rng, sig)
            has_nan = any(isinstance(v, float) and not math.isfinite(v) for t in body["inputs"] for v in t["data"])
            took = _compare(body, check)
            if nonfinite == "pass" or not has_nan:
                assert took, f"a plain body was not taken: {body}"
            taken += took
            for _ in range(4):
                declined += not _compare(_mutate(rng, body), check)
    assert taken > 100 and declined > 100


def test_what_the_plain_decoder_leaves_to_the_general_one() -> None:
    sig = Signature((TensorSpec("x", "INT16", (-1, 2)),), (TensorSpec("y", "FP32", (-1,)),))
    check = InputCheck(sig, "m")
    ok = {"inputs": [{"name": "x", "datatype": "INT16", "shape": [1, 2], "data": [1, 2]}]}
    assert decode_plain(ok, check) is not None
    widened = {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 2], "data": [1, 2]}]}
    assert decode_plain(widened, check) is None  # a widening: the general path converts it
    assert decode_request(widened, None, check).inputs["x"].dtype == np.int16
    # A table's own rules (a [N, 1] column, null as NaN) are never the plain path's.
    table = TableCheck(Signature((TensorSpec("a", "FP64", (-1,)),), (TensorSpec("y", "FP32", (-1,)),)), "t")
    assert table.plain is None
    strings = InputCheck(Signature((TensorSpec("s", "BYTES", (-1,)),), ()), "m")
    assert strings.plain is None
    assert InputCheck(Signature(), "m").plain is None  # untyped: names not known


def test_a_plain_body_through_the_rest_handler_is_the_general_answer() -> None:
    """The handler's own decoding (rest.RestApp._decode) of a plain body and of the same body made
    not plain (a harmless ``parameters: {}``) give the same tensors."""
    from modelpod.protocols.rest import RestApp
    from modelpod.protocols.wire import Request
    from modelpod.serving.engine import InferenceEngine
    from modelpod.settings import Settings

    sig = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1,)),))
    check = InputCheck(sig, "m")
    app = RestApp(InferenceEngine(Settings()), Settings())
    data = [0.1, -2.5e-7, 3.4e38]
    plain = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": data}]}
    general = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": data, "parameters": {}}]}
    decoded = [app._decode(Request("POST", "/v2/models/m/infer", "", {}, json.dumps(b).encode(), True, 0.0), check)
               for b in (plain, general)]
    _same(decoded[0], decoded[1])
    assert decoded[0].inputs["x"].tolist() == np.asarray([data], np.float32).tolist()


# -- the binary tensor extension: a JSON header, then the tensors' bytes ---------------------------
def _binary(rng: random.Random, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The same body with every input's data moved to the binary tail (in the header's order)."""
    body = copy.deepcopy(body)
    tail = b""
    for t in body["inputs"]:
        raw = np.asarray(t.pop("data"), dtype=DATATYPES[t["datatype"]].newbyteorder("<")).tobytes()
        t["parameters"] = {"binary_data_size": len(raw)}
        tail += raw
    if rng.random() < 0.5:
        body["outputs"] = [{"name": "out", "parameters": {"binary_data": rng.random() < 0.5}}]
    return body, tail


def _mutate_binary(rng: random.Random, body: dict[str, Any], tail: bytes) -> tuple[dict[str, Any], bytes]:
    body = copy.deepcopy(body)
    t = rng.choice(body["inputs"])
    kind = rng.randrange(10)
    if kind == 0:
        tail += b"\0"
    elif kind == 1:
        tail = tail[:-1]
    elif kind == 2:
        t["parameters"]["binary_data_size"] += rng.choice([-1, 1, 8])
    elif kind == 3:
        t["parameters"]["binary_data_size"] = rng.choice([True, "8", -1, 1.0])
    elif kind == 4:
        t["parameters"]["extra"] = 1
    elif kind == 5:
        t["data"] = [0]
    elif kind == 6:
        body["outputs"] = [{"name": "out", "parameters": {"binary_data": rng.choice(["true", 1, None])}}]
    elif kind == 7:
        body["outputs"] = [{"name": "out", "parameters": {}}, {"name": "out"}]
    elif kind == 8:
        body["inputs"].reverse()  # the tail's order no longer follows the header's
    else:
        t["datatype"] = rng.choice(NUMERIC)
    return body, tail


@pytest.mark.parametrize("seed", range(6))
def test_the_plain_decoder_answers_binary_bodies_as_the_general_one(seed: int) -> None:
    rng = random.Random(1000 + seed)
    taken = declined = 0
    for _ in range(60):
        sig = _signature(rng)
        for nonfinite in ("pass", "reject"):
            check = InputCheck(sig, "m", nonfinite)
            body, tail = _binary(rng, _body(rng, sig))
            has_nan = not all(np.isfinite(a).all() for a in decode_request(copy.deepcopy(body), tail).inputs.values()
                              if a.dtype.kind == "f")
            took = _compare(body, check, tail)
            if nonfinite == "pass" or not has_nan:
                assert took, f"a plain binary body was not taken: {body}"
            taken += took
            for _ in range(4):
                mutated, cut = _mutate_binary(rng, body, tail)
                declined += not _compare(mutated, check, cut)
    assert taken > 100 and declined > 100
