"""The records that cross a boundary: protocol -> engine (InferRequest/InferResult) and server <-> replica.

Everything here is a small immutable record of plain values (cog's ``eventtypes`` idea), so both
sides agree on one definition and nothing else travels. Between the server and a replica process
(``serving/replicas.py`` and ``serving/replica_child.py``) each record is one packet on a
``SOCK_SEQPACKET`` socket pair (``pack``/``unpack``): the two that go once per batch, ``Run`` and
``Ran``, in a fixed little-endian layout, the rare others pickled. Tensors never travel: they sit
in a shared-memory region (``serving/shm.py``) and only their ``TensorRef`` (where, what dtype,
what shape) is in the record.

Conversation, server (S) and child (C)::

    S -> C  Start                 once, first
    C -> S  Ready | StartFailed   after the model loaded (or did not)
    S -> C  Run                   one batch at a time
    C -> S  Ran | RunFailed       its outputs (or the model's error)
    S -> C  Stop                  finish and exit 0 (EOF on the socket means the same)

A replica is forked from its model's template process (``serving/replica_template.py``), which
has imported the framework and verified the pod once; server (S) and template (T)::

    S -> T  Start                 once, first: what to preload
    S -> T  Fork                  one per replica, with the replica's socket and output pipe (fds)
    T -> S  Forked | Exited       the replica's pid; later its exit status (the template reaps it)
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from modelpod.pod import Signature

Batch = dict[str, np.ndarray[Any, Any]]


# -- protocol <-> engine ------------------------------------------------------------------------
# Plain slotted records: a frozen dataclass sets each field through object.__setattr__, which costs
# a request about 8,000 instructions per record (two per request).
@dataclass(slots=True)
class InferRequest:
    """One decoded inference request, as every protocol hands it to the engine."""

    inputs: Batch
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # Requested outputs: name -> wants binary; None means every output, JSON unless binary asked.
    outputs: Mapping[str, bool] | None = None
    binary_output: bool = False
    # The signature the inputs were checked against while decoding (the engine skips checking again).
    checked: Signature | None = None


@dataclass(slots=True)
class InferResult:
    """What a protocol encodes back: the model that answered and its outputs."""

    model_name: str
    model_version: str | None
    outputs: Batch
    id: str | None = None
    route: str | None = None  # the route that chose this variant, if one did
    variant: str = ""  # NAME:VERSION of the version that answered (the ``modelpod-variant`` header)


# -- server <-> replica process -------------------------------------------------------------------
# The per-batch records (Region, TensorRef, Run, Ran) are named tuples: built twice per batch and
# tensor on each side, where a frozen dataclass's field-by-field __setattr__ would cost more than
# the rest of the record's trip.
class Region(NamedTuple):
    """A shared-memory file (under /dev/shm) of ``size`` bytes, mapped by both sides."""

    path: str
    size: int


class TensorRef(NamedTuple):
    """Where one tensor lies in a region. ``kind``: ``raw`` (the array's bytes), ``bytes``/``str``
    (BYTES elements: ``count`` little-endian uint32 lengths, then the data), ``pickle`` (anything
    else an object array may hold, e.g. the request parameters)."""

    name: str
    kind: str
    dtype: str  # numpy dtype.str for raw; "|O" otherwise
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Start:
    """What the child loads: a pinned store reference or a pod directory, under ``home``."""

    label: str
    home: str
    ref: str | None = None
    path: str | None = None
    replica: int = 0


@dataclass(frozen=True)
class Ready:
    pid: int
    load_seconds: float
    rss_bytes: int
    takes_parameters: bool = False
    row_parameters: bool = False  # ... one entry per row (requests with different parameters merge)


@dataclass(frozen=True)
class StartFailed:
    """The model could not load in the child; ``error`` is one line, ``detail`` the traceback."""

    error: str
    detail: str = ""


class Run(NamedTuple):
    seq: int
    region: Region
    tensors: tuple[TensorRef, ...]


class Ran(NamedTuple):
    seq: int
    region: Region  # the child's output region (it grows by replacement: a new path)
    tensors: tuple[TensorRef, ...]
    rss_bytes: int


@dataclass(frozen=True)
class RunFailed:
    """The model raised: ``error`` names a ``modelpod.errors`` class; ``message`` is what the client
    may see, ``detail`` what only the server log gets."""

    seq: int
    error: str
    message: str
    detail: str = ""
    rss_bytes: int = 0


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Fork:
    """Fork replica ``replica``; its socket and its output pipe travel with the record (SCM_RIGHTS)."""

    replica: int


@dataclass(frozen=True)
class Forked:
    replica: int
    pid: int


@dataclass(frozen=True)
class Exited:
    """A forked replica exited: ``code`` as ``subprocess`` gives it (negative: killed by that signal)."""

    pid: int
    code: int


ToChild = Start | Run | Stop
FromChild = Ready | StartFailed | Ran | RunFailed


# -- the server <-> replica wire format -------------------------------------------------------------
# One record per packet, its first byte the tag. Run and Ran: the tag, seq and rss (0 for Run),
# then the layout: tensor count, path length, region size, the region's path, and per tensor a
# fixed part (kind, ndim, dtype and name lengths, offset, nbytes), its shape as int64s, its dtype
# string and name. Pickling those (dataclasses) cost ~100k instructions a record: pickle looks each
# class up by module and name. Batch after batch the layout repeats (the same region, names and,
# mostly, shapes), so both ends keep the last layouts they packed or read. Everything else is rare
# and pickled.
MAX_PACKET = 1 << 17  # the largest record (under the sockets' default buffer); error texts are clipped to fit
_RUN, _RAN, _PICKLED = b"R"[0], b"D"[0], b"P"[0]
_HEAD = struct.Struct("<BQQ")  # tag, seq, rss
_LAYOUT = struct.Struct("<HHQ")  # tensors, path length, region size
_TENSOR = struct.Struct("<BBBxHQQ")
_KINDS = {"raw": 0, "bytes": 1, "str": 2, "pickle": 3}
_KIND_NAMES = tuple(_KINDS)
_SHAPES = tuple(struct.Struct(f"<{n}q") for n in range(65))  # numpy has at most 64 dimensions
_CACHED = 256  # layouts kept on each side (then the cache starts again)
_packed: dict[tuple[Region, tuple[TensorRef, ...]], bytes] = {}
_read: dict[bytes, tuple[Region, tuple[TensorRef, ...]]] = {}


def pack(record: ToChild | FromChild) -> bytes:
    """``record`` as one packet."""
    if isinstance(record, (Run, Ran)):
        key = (record.region, record.tensors)
        layout = _packed.get(key)
        if layout is None:
            layout = _pack_layout(*key)
            if len(_packed) >= _CACHED:
                _packed.clear()
            _packed[key] = layout
        if isinstance(record, Ran):
            return _HEAD.pack(_RAN, record.seq, record.rss_bytes) + layout
        return _HEAD.pack(_RUN, record.seq, 0) + layout
    return bytes((_PICKLED,)) + pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)


def _pack_layout(region: Region, tensors: tuple[TensorRef, ...]) -> bytes:
    path = region.path.encode("utf-8", "surrogateescape")
    parts = [_LAYOUT.pack(len(tensors), len(path), region.size), path]
    for ref in tensors:
        name = ref.name.encode("utf-8", "surrogatepass")
        dtype = ref.dtype.encode("ascii")
        ndim = len(ref.shape)
        parts.append(_TENSOR.pack(_KINDS[ref.kind], ndim, len(dtype), len(name), ref.offset, ref.nbytes))
        parts.append(_SHAPES[ndim].pack(*ref.shape))
        parts.append(dtype)
        parts.append(name)
    return b"".join(parts)


def unpack(data: bytes | memoryview) -> ToChild | FromChild:
    """The record one packet holds; ``ValueError`` (or ``struct.error``) for one that is malformed."""
    tag = data[0]
    if tag == _PICKLED:
        record: ToChild | FromChild = pickle.loads(data[1:])  # from our own server or replica
        if not isinstance(record, (Start, Ready, StartFailed, RunFailed, Stop)):
            raise ValueError(f"not a replica record: {type(record).__name__}")
        return record
    if tag != _RUN and tag != _RAN:
        raise ValueError(f"unknown record tag {tag}")
    _, seq, rss = _HEAD.unpack_from(data)
    raw = bytes(data[_HEAD.size :])
    layout = _read.get(raw)
    if layout is None:
        layout = _unpack_layout(raw)
        if len(_read) >= _CACHED:
            _read.clear()
        _read[raw] = layout
    if tag == _RUN:
        return Run(seq, *layout)
    return Ran(seq, *layout, rss)


def _unpack_layout(data: bytes) -> tuple[Region, tuple[TensorRef, ...]]:
    count, plen, size = _LAYOUT.unpack_from(data)
    pos = _LAYOUT.size
    path = str(data[pos : pos + plen], "utf-8", "surrogateescape")
    pos += plen
    refs = []
    fixed = _TENSOR.size
    for _ in range(count):
        kind, ndim, dlen, nlen, offset, nbytes = _TENSOR.unpack_from(data, pos)
        pos += fixed
        shape: tuple[int, ...] = _SHAPES[ndim].unpack_from(data, pos)
        pos += 8 * ndim
        dtype = str(data[pos : pos + dlen], "ascii")
        pos += dlen
        name = str(data[pos : pos + nlen], "utf-8", "surrogatepass")
        pos += nlen
        refs.append(TensorRef(name, _KIND_NAMES[kind], dtype, shape, offset, nbytes))
    if pos != len(data):
        raise ValueError("a record with trailing bytes")
    return Region(path, size), tuple(refs)


def clip(text: str, limit: int = 8192) -> str:
    """``text`` cut to ``limit`` characters: an error's message and traceback must fit one packet
    (two texts of 8192 characters are at most 64 KiB of UTF-8)."""
    return text if len(text) <= limit else text[: limit - 20] + "\n... (cut)"
