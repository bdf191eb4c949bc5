"""The records that cross a boundary: protocol -> engine (InferRequest/InferResult) and server <-> replica.

Everything here is a small frozen dataclass of plain values (cog's ``eventtypes`` idea), so both
sides agree on one definition and nothing else travels. Between the server and a replica process
(``serving/replicas.py`` and ``serving/replica_child.py``) the records go pickled over a socket pair;
tensors never do: they sit in a shared-memory region (``serving/shm.py``) and only their
``TensorRef`` (where, what dtype, what shape) is in the record.

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
@dataclass(frozen=True)
class Region:
    """A shared-memory file (under /dev/shm) of ``size`` bytes, mapped by both sides."""

    path: str
    size: int


@dataclass(frozen=True)
class TensorRef:
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


@dataclass(frozen=True)
class Run:
    seq: int
    region: Region
    tensors: tuple[TensorRef, ...]


@dataclass(frozen=True)
class Ran:
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
