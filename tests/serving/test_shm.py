"""Shared-memory hand-off: every OIP datatype round-trips, BYTES compactly, regions grow and go away."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpod.model import PARAMETERS, with_parameters
from modelpod.pod import DATATYPES
from modelpod.serving.messages import Region, TensorRef
from modelpod.serving.shm import MIN_SIZE, Reader, Writer

RNG = np.random.default_rng(0)


def sample(datatype: str, shape: tuple[int, ...] = (3, 4)) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return np.array([bytes(RNG.integers(0, 256, size=i % 7, dtype=np.uint8)) for i in range(12)],
                        dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (RNG.normal(size=shape) * 1e3).astype(dtype)


def round_trip(batch: dict[str, np.ndarray[Any, Any]], copy: bool = True
               ) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[TensorRef, ...]]:
    writer, reader = Writer(f"modelpod-test-{os.getpid()}"), Reader()
    try:
        region, refs = writer.write(batch)
        return reader.read(region, refs, copy=copy), refs
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips(datatype: str) -> None:
    arr = sample(datatype)
    out, refs = round_trip({"t": arr})
    got = out["t"]
    assert got.dtype == arr.dtype and got.shape == arr.shape
    if datatype == "BYTES":
        assert got.tolist() == arr.tolist() and refs[0].kind == "bytes"
        assert refs[0].nbytes == 4 * arr.size + sum(len(b) for b in arr.reshape(-1))  # lengths + data, no pickle
    else:
        np.testing.assert_array_equal(got, arr)
        assert refs[0].kind == "raw" and refs[0].nbytes == arr.nbytes


def test_many_tensors_at_once_are_aligned_and_independent() -> None:
    batch = {dt: sample(dt) for dt in sorted(DATATYPES)}
    out, refs = round_trip(batch)
    assert all(r.offset % 64 == 0 for r in refs)
    for name, arr in batch.items():
        assert out[name].tolist() == arr.tolist()


def test_strings_odd_layouts_and_parameters() -> None:
    text = np.array(["héllo", "", "\U0001f600"], dtype=object)
    wide = np.array(["ab", "cde"])  # numpy unicode: raw bytes
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # not contiguous
    swapped = np.arange(5, dtype=">i4")  # big-endian
    scalar = np.float64(3.5).reshape(())
    empty = np.zeros((0, 3), np.float32)
    batch = with_parameters({"text": text, "wide": wide, "strided": strided, "swapped": swapped,
                             "scalar": scalar, "empty": empty}, {"conf": 0.25, "classes": [1, 2]})
    out, refs = round_trip(batch)
    kinds = {r.name: r.kind for r in refs}
    assert kinds["text"] == "str" and kinds["wide"] == "raw" and kinds[PARAMETERS] == "pickle"
    assert out["text"].tolist() == text.tolist()
    assert out["wide"].tolist() == ["ab", "cde"]
    np.testing.assert_array_equal(out["strided"], strided)
    assert out["swapped"].dtype.str == ">i4" and out["swapped"].tolist() == [0, 1, 2, 3, 4]
    assert out["scalar"].shape == () and float(out["scalar"]) == 3.5
    assert out["empty"].shape == (0, 3)
    assert out[PARAMETERS][()] == {"conf": 0.25, "classes": [1, 2]}


def test_views_point_into_the_shared_region_copies_do_not() -> None:
    writer, reader = Writer(f"modelpod-test-{os.getpid()}"), Reader()
    try:
        region, refs = writer.write({"x": np.arange(8, dtype=np.int64)})
        view = reader.read(region, refs, copy=False)["x"]
        copy = reader.read(region, refs, copy=True)["x"]
        writer.write({"x": np.full(8, 7, dtype=np.int64)})  # the next batch reuses the region
        assert view.tolist() == [7] * 8  # the same memory, no copy made
        assert copy.tolist() == list(range(8))
        del view
    finally:
        reader.close()
        writer.close()


def test_a_region_grows_under_a_new_name_and_the_old_name_goes() -> None:
    writer = Writer(f"modelpod-test-{os.getpid()}")
    try:
        small, _ = writer.write({"x": np.zeros(10, np.uint8)})
        assert small.size == MIN_SIZE and Path(small.path).exists()
        big, refs = writer.write({"x": np.ones(3 * MIN_SIZE, np.uint8)})
        assert big.path != small.path and big.size >= 3 * MIN_SIZE
        assert not Path(small.path).exists()
        reader = Reader()
        assert int(reader.read(big, refs, copy=True)["x"].sum()) == 3 * MIN_SIZE
        reader.close()
    finally:
        writer.close()
    assert not Path(big.path).exists()


def test_another_process_reads_what_this_one_wrote() -> None:
    """The hand-off as a replica sees it: a second interpreter maps the region by its path."""
    arr = sample("FP32", (4, 5))
    text = np.array([b"a", b"bc"], dtype=object)
    writer = Writer(f"modelpod-test-{os.getpid()}")
    try:
        region, refs = writer.write({"x": arr, "t": text})
        code = ("import pickle, sys\n"
                "from modelpod.serving.shm import Reader\n"
                "region, refs = pickle.loads(sys.stdin.buffer.read())\n"
                "out = Reader().read(region, refs, copy=True)\n"
                "sys.stdout.buffer.write(pickle.dumps({k: v.tolist() for k, v in out.items()}))\n")
        proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((region, refs)), capture_output=True,
                              timeout=120, check=True)
        got = pickle.loads(proc.stdout)
        assert got == {"x": arr.tolist(), "t": [b"a", b"bc"]}
    finally:
        writer.close()


def test_records_are_small_and_carry_no_tensor_data() -> None:
    big = np.ones((1000, 100), np.float64)
    writer = Writer(f"modelpod-test-{os.getpid()}")
    try:
        region, refs = writer.write({"x": big})
        assert isinstance(region, Region)
        assert len(pickle.dumps((region, refs))) < 500  # 800 kB of tensor, a few hundred bytes of record
    finally:
        writer.close()
