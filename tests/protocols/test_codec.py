"""OIP tensors <-> numpy: JSON (flat and nested), the binary extension, BYTES, requested outputs."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from modelpod.errors import InvalidRequestError
from modelpod.protocols.codec import decode_request, encode_response, tensor_from_bytes, tensor_to_bytes


def test_flat_and_nested_data_decode_alike() -> None:
    flat = decode_request({"inputs": [{"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]}]})
    nested = decode_request({"inputs": [{"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]})
    np.testing.assert_array_equal(flat.inputs["a"], nested.inputs["a"])
    assert flat.inputs["a"].dtype == np.int32


def test_binary_inputs_in_order_and_bytes_elements() -> None:
    floats = np.arange(4, dtype=np.float32)
    words = np.array([b"hi", b""], dtype=object)
    tail = floats.tobytes() + tensor_to_bytes(words)
    req = decode_request({"inputs": [
        {"name": "f", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
        {"name": "w", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(tail) - 16}},
    ]}, tail)
    np.testing.assert_array_equal(req.inputs["f"], floats)
    assert req.inputs["w"].tolist() == [b"hi", b""]
    assert tensor_to_bytes(words) == struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)


@pytest.mark.parametrize("obj, tail, fragment", [
    ({"inputs": [{"name": "f", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]},
     b"\0" * 8, "runs past"),
    ({"inputs": [{"name": "f", "datatype": "FP32", "shape": [1], "data": [1]}]}, b"\0" * 4, "not claimed"),
    ({"inputs": [{"name": "f", "datatype": ["FP32"], "shape": [1], "data": [1]}]}, None, "datatype"),
    ({"inputs": [{"name": "f", "datatype": "FP32", "shape": [-1], "data": [1]}]}, None, "shape"),
    ({"inputs": [{"name": "f", "datatype": "FP32", "shape": [1], "data": [1e300]}]}, None, "does not fit"),
    ({"inputs": [{"name": "f", "datatype": "BYTES", "shape": [1], "data": [1]}]}, None, "strings"),
    ({"inputs": [{"name": "i", "datatype": "INT64", "shape": [2], "data": [1, 1.5]}]}, None, "must be integers"),
    ({"inputs": [{"name": "i", "datatype": "INT32", "shape": [1], "data": [True]}]}, None, "must be integers"),
    ({"inputs": [{"name": "i", "datatype": "UINT8", "shape": [1], "data": [-1]}]}, None, "does not fit"),
    ({"inputs": [{"name": "i", "datatype": "INT8", "shape": [1], "data": [300]}]}, None, "does not fit"),
    ({"inputs": []}, None, "non-empty"),
])
def test_malformed_requests(obj: dict, tail: bytes | None, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError, match=fragment):
        decode_request(obj, tail)


def test_truncated_bytes_element() -> None:
    with pytest.raises(InvalidRequestError, match="truncated"):
        tensor_from_bytes("w", "BYTES", (1,), memoryview(struct.pack("<I", 5) + b"ab"))


def test_requested_outputs_json_and_binary() -> None:
    req = decode_request({"id": "7", "inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}],
                          "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]})
    outputs = {"x": np.zeros(2), "y": np.ones(2, dtype=np.float32), "z": np.array([b"q"], dtype=object)}
    body, tails = encode_response("m", "1", outputs, req)
    assert body["id"] == "7" and [o["name"] for o in body["outputs"]] == ["y", "z"]
    assert body["outputs"][0]["parameters"] == {"binary_data_size": 8} and tails == [np.ones(2, "<f4").tobytes()]
    assert body["outputs"][1] == {"name": "z", "datatype": "BYTES", "shape": [1], "data": ["q"]}
