"""The server <-> replica wire format: every record as one packet, tensors exactly through shared memory.

``Run``/``Ran`` go in a fixed layout (``messages.pack``/``unpack``), the rest pickled; the tensors they
name sit in a ``shm`` region. Randomised batches of every datatype, shape and memory layout must come
back bit for bit, and through a real ``SOCK_SEQPACKET`` pair as a replica's records do.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from modelpod.model import with_parameters
from modelpod.pod import DATATYPES
from modelpod.serving.messages import (
    MAX_PACKET,
    Ran,
    Ready,
    Region,
    Run,
    RunFailed,
    Start,
    StartFailed,
    Stop,
    TensorRef,
    clip,
    pack,
    unpack,
)
from modelpod.serving.replica import Replica
from modelpod.serving.shm import Reader, Writer


def random_array(rng: np.random.Generator, datatype: str) -> np.ndarray[Any, Any]:
    """A tensor of ``datatype`` with 0-4 dimensions (some empty), sometimes strided or byte-swapped."""
    shape = tuple(int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 5))))
    size = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        items = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 9)), dtype=np.uint8)) for _ in range(size)]
        arr = np.empty(size, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = DATATYPES[datatype]
    # Every bit pattern (NaNs, infinities, subnormals, -0.0 for floats), from random bytes.
    arr = np.frombuffer(rng.bytes(size * dtype.itemsize), dtype=dtype).copy() if dtype.kind != "b" else (
        rng.integers(0, 2, size=size).astype(bool))
    arr = arr.reshape(shape)
    layout = int(rng.integers(0, 4))
    if layout == 1 and arr.ndim >= 2:
        arr = arr.T  # Fortran order
    elif layout == 2 and arr.ndim >= 1:
        arr = np.repeat(arr, 2, axis=0)[::2]  # a strided view
    elif layout == 3 and dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder(">"))  # big-endian
    return arr


def same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "O":
        return bool(a.tolist() == b.tolist())
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()  # bit for bit


@pytest.fixture
def ends() -> Iterator[tuple[Writer, Reader]]:
    writer, reader = Writer(f"modelpod-test-msg-{os.getpid()}"), Reader()
    yield writer, reader
    reader.close()
    writer.close()


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_of_every_datatype_come_back_bit_for_bit(seed: int, ends: tuple[Writer, Reader]) -> None:
    writer, reader = ends
    rng = np.random.default_rng(seed)
    for round_ in range(6):  # the region is reused (and sometimes grows) batch after batch
        batch = {f"t{i}-{dt}": random_array(rng, dt) for i, dt in enumerate(sorted(DATATYPES) * 2)}
        if round_ == 3:
            batch["big"] = rng.normal(size=(300, 1000))  # 2.4 MB: past the first region
        region, refs = writer.write(batch)
        seq = int(rng.integers(0, 2**63))
        packet = pack(Run(seq, region, refs))
        got = unpack(packet)
        assert isinstance(got, Run) and got == Run(seq, region, refs)
        assert len(packet) < 64 * len(refs) + 200  # a few dozen bytes a tensor, no tensor data
        for copy in (False, True):
            out = reader.read(got.region, got.tensors, copy=copy)
            assert list(out) == list(batch)
            for name, arr in batch.items():
                assert same(out[name], arr), name
            del out


def test_run_and_ran_keep_their_own_fields_when_they_share_a_layout(ends: tuple[Writer, Reader]) -> None:
    writer, _ = ends
    region, refs = writer.write({"x": np.zeros((2, 3), np.float32), "label": np.zeros(2, np.int64)})
    records = [Run(1, region, refs), Run(2, region, refs), Ran(1, region, refs, 0), Ran(2**63, region, refs, 2**40)]
    assert [unpack(pack(r)) for r in records] == records
    assert [type(unpack(pack(r))) for r in records] == [Run, Run, Ran, Ran]
    # The same names with other rows: another layout, read as such.
    other_region, other = writer.write({"x": np.zeros((5, 3), np.float32), "label": np.zeros(5, np.int64)})
    assert unpack(pack(Ran(3, other_region, other, 7))) == Ran(3, other_region, other, 7)
    assert [r.shape for r in other] == [(5, 3), (5,)]
    odd = Run(4, Region("/dev/shm/é\udcff", 1 << 20), (TensorRef("naïve \U0001f600", "str", "|O", (), 64, 0),))
    assert unpack(pack(odd)) == odd  # any name and path, and a 0-d tensor


def test_the_other_records_are_pickled_and_nothing_else_is_read() -> None:
    for record in (Start("m:1", "/home", ref="m@sha256:ab"), Ready(7, 0.5, 100, True, False),
                   StartFailed("ImportError: x", "Traceback"), RunFailed(3, "ModelInputError", "bad", "", 9), Stop()):
        assert unpack(pack(record)) == record
    import pickle

    with pytest.raises(ValueError, match="not a replica record"):
        unpack(b"P" + pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="unknown record tag"):
        unpack(b"Z" + bytes(40))
    good = pack(Run(1, Region("/dev/shm/r", 4096), (TensorRef("x", "raw", "<f4", (2, 2), 0, 16),)))
    with pytest.raises(ValueError, match="trailing"):
        unpack(good + b"\0")
    with pytest.raises((struct.error, ValueError, IndexError)):
        unpack(good[:-3])


def test_a_tensor_outside_its_region_or_of_objects_is_refused(ends: tuple[Writer, Reader]) -> None:
    writer, reader = ends
    region, refs = writer.write({"x": np.arange(4, dtype=np.int32)})
    past = (refs[0]._replace(offset=region.size - 8),)
    with pytest.raises(TypeError):
        reader.read(region, past, copy=True)
    with pytest.raises(ValueError, match="objects"):
        reader.read(region, (refs[0]._replace(dtype="|O"),), copy=True)


def test_error_texts_are_clipped_so_any_failure_fits_one_packet() -> None:
    huge = "\U0001f600" * 100_000  # 400 kB of UTF-8
    record = RunFailed(1, "InferenceError", clip(huge), clip(huge), 0)
    packet = pack(record)
    assert len(packet) <= MAX_PACKET and record.message.endswith("(cut)")
    assert clip("short") == "short"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(packet)
        assert unpack(b.recv(MAX_PACKET)) == record


def test_a_replica_reads_each_record_whole_and_in_order_then_the_end() -> None:
    """The server's end of a replica's socket, with the child's end played here."""
    r = Replica(0, "echo:1")
    ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    r.conn = ours
    writer = Writer(f"modelpod-out-test-{os.getpid()}")
    try:
        assert r.receive() is None  # nothing waiting: no block
        outputs = {"y": np.arange(6, dtype=np.float64).reshape(3, 2),
                   "names": np.array([b"a", b"", b"xyz"], dtype=object)}
        region, refs = writer.write(outputs)
        sent = [Ready(1, 0.1, 10), Ran(1, region, refs, 20), RunFailed(2, "InferenceError", "model failed"),
                Ran(3, region, refs, 30)]
        for record in sent:
            child.send(pack(record))
        got = []
        while (item := r.receive()) is not None:
            got.append(item)
        assert [m for m, _ in got] == sent
        for msg, out in got:
            if isinstance(msg, Ran):
                assert out is not None and all(same(out[k], v) for k, v in outputs.items())
        writer.write({"y": np.zeros((3, 2)), "names": outputs["names"]})  # the child's next batch...
        assert got[1][1] is not None and got[1][1]["y"][2, 1] == 5.0  # ...leaves what was read alone
        child.send(b"P" + b"not a pickle")
        with pytest.raises(Exception):  # noqa: B017 - whatever unpickling raises: the replica is broken
            r.receive()
        child.send(bytes(MAX_PACKET + 10))
        with pytest.raises(ValueError, match="more than"):
            r.receive()
        child.send(pack(Start("m", "/h")))
        with pytest.raises(ValueError, match="not a record from a replica"):
            r.receive()
        child.close()
        with pytest.raises(EOFError):
            r.receive()
    finally:
        writer.close()
        r.cleanup()
        child.close()
    assert r.conn is None


def test_with_parameters_the_request_parameters_travel_too(ends: tuple[Writer, Reader]) -> None:
    writer, reader = ends
    batch = with_parameters({"x": np.ones((2, 2), np.float32)}, {"threshold": 0.5, "tags": ["a", "b"]})
    region, refs = writer.write(batch)
    got = unpack(pack(Run(9, region, refs)))
    assert isinstance(got, Run)
    out = reader.read(got.region, got.tensors, copy=True)
    assert {r.name: r.kind for r in refs}["x"] == "raw"
    assert all(same(out[k], v) for k, v in batch.items() if v.dtype.kind != "O")
    (params,) = [k for k, v in batch.items() if v.dtype.kind == "O"]
    assert out[params][()] == batch[params][()]
