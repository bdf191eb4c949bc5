"""Shared memory between the server and its replica processes: a mapped file per direction.

A ``SharedRegion`` is a file under ``/dev/shm`` (tmpfs: memory, not disk) mapped by both processes.
The writer packs a batch's tensors into it, 64-byte aligned, and sends only their ``TensorRef``s;
the reader maps the same bytes. Numeric tensors travel as their raw bytes; BYTES tensors (numpy
object arrays of ``bytes`` or ``str``) as a length table plus the data, as the OIP binary extension
lays them out; anything else an object array holds (the request parameters) is pickled, small.

A region that is too small is replaced by a bigger one under a new name (the reader maps the new
path it is sent); the old mapping is closed once no array points into it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.serving.messages import Batch, Region, TensorRef

ALIGN = 64
MIN_SIZE = 1 << 20
_U32 = np.dtype("<u4")


def shm_dir() -> Path:
    """Where regions live: /dev/shm when the system has it (Linux), else the temp directory."""
    dev = Path("/dev/shm")
    if dev.is_dir() and os.access(dev, os.W_OK):
        return dev
    import tempfile

    return Path(tempfile.gettempdir())


class SharedRegion:
    """One mapped file. ``create`` makes it (this process owns the name); otherwise it maps ``path``."""

    def __init__(self, path: str, size: int, *, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.linked = create
        self.record = Region(path, size)

    @classmethod
    def new(cls, prefix: str, size: int) -> SharedRegion:
        size = max(MIN_SIZE, 1 << max(0, size - 1).bit_length())  # a power of two: few regrowths
        return cls(str(shm_dir() / f"{prefix}-{secrets.token_hex(4)}"), size, create=True)

    def unlink(self) -> None:
        """Remove the name (the mappings stay valid); once both sides have mapped it, or on exit."""
        if self.linked:
            self.linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # an array still points into it: it goes with the last one
            self.map.close()


class Writer:
    """Packs batches into a region it owns (the same one batch after batch), growing it under a new
    name when a batch does not fit."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.region: SharedRegion | None = None

    def write(self, batch: Batch) -> tuple[Region, tuple[TensorRef, ...]]:
        parts = []
        total = 0
        for name, arr in batch.items():
            dtype = arr.dtype
            if dtype.kind == "O":
                kind, data = _objects(arr)
                parts.append((name, kind, "|O", arr.shape, data, data.nbytes, total))
            else:
                parts.append((name, "raw", dtype.str, arr.shape, arr, arr.nbytes, total))
            total = (total + parts[-1][5] + ALIGN - 1) & -ALIGN
        region = self.region
        if region is None or region.size < total:
            if region is not None:
                region.unlink()
                region.close()
            region = self.region = SharedRegion.new(self.prefix, total)
        buf: Any = region.map  # an ndarray is a buffer (C-contiguous: no copy to get one)
        refs = []
        for name, kind, dstr, shape, data, n, offset in parts:
            if n:
                try:  # a C-contiguous array: one memcpy
                    buf[offset : offset + n] = data
                except (BufferError, ValueError, TypeError):  # any other strides: numpy copies them in
                    np.ndarray(data.shape, data.dtype, buffer=buf, offset=offset)[...] = data
            refs.append(TensorRef(name, kind, dstr, shape, offset, n))
        return region.record, tuple(refs)

    def close(self) -> None:
        if self.region is not None:
            self.region.unlink()
            self.region.close()
            self.region = None


class Reader:
    """Maps the regions another process writes; ``read`` views (or copies) tensors out of them."""

    def __init__(self) -> None:
        self.region: SharedRegion | None = None

    def attach(self, record: Region) -> SharedRegion:
        region = self.region
        if region is None or region.path != record.path:
            if region is not None:
                region.close()
            region = self.region = SharedRegion(record.path, record.size, create=False)
        return region

    def read(self, record: Region, refs: tuple[TensorRef, ...], *, copy: bool) -> Batch:
        buf = self.attach(record).map
        return {ref.name: decode(buf, ref, copy=copy) for ref in refs}

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None


def _objects(arr: np.ndarray[Any, Any]) -> tuple[str, np.ndarray[Any, Any]]:
    """An object array's kind and bytes: BYTES/str elements as lengths + data, anything else pickled."""
    items = arr.reshape(-1).tolist()
    if items and all(isinstance(x, bytes) for x in items):
        kind, data = "bytes", items
    elif items and all(isinstance(x, str) for x in items):
        kind, data = "str", [x.encode("utf-8", "surrogatepass") for x in items]
    else:
        return "pickle", np.frombuffer(pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    lengths = np.fromiter((len(x) for x in data), dtype=_U32, count=len(data))
    return kind, np.frombuffer(lengths.tobytes() + b"".join(data), np.uint8)


_DTYPES: dict[str, np.dtype[Any]] = {}


def decode(buf: Any, ref: TensorRef, *, copy: bool) -> np.ndarray[Any, Any]:
    """The tensor ``ref`` describes in ``buf``: a view into it, or (``copy``) an array of its own."""
    if ref.kind == "raw":
        dtype = _DTYPES.get(ref.dtype)
        if dtype is None:
            dtype = np.dtype(ref.dtype)
            if dtype.kind == "O":
                raise ValueError("a raw tensor cannot hold objects")
            if len(_DTYPES) < 256:
                _DTYPES[ref.dtype] = dtype
        view = np.ndarray(ref.shape, dtype, buffer=buf, offset=ref.offset)
        return view.copy() if copy else view
    raw = memoryview(buf)[ref.offset : ref.offset + ref.nbytes]
    try:
        if ref.kind == "pickle":
            out: np.ndarray[Any, Any] = pickle.loads(raw)  # written by our own server or child
            return out
        count = int(np.prod(ref.shape, dtype=np.int64))
        lengths = np.frombuffer(raw, _U32, count).tolist()
        flat = np.empty(count, dtype=object)
        pos = 4 * count
        text = ref.kind == "str"
        for i, n in enumerate(lengths):
            chunk = bytes(raw[pos : pos + n])
            flat[i] = chunk.decode("utf-8", "surrogatepass") if text else chunk
            pos += n
        return flat.reshape(ref.shape)
    finally:
        raw.release()
