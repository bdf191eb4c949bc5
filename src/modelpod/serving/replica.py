"""Replica: one worker process as the server sees it: its socket, its regions, its exit and output.

``ReplicaSet`` (``serving/replicas.py``) owns the replicas and runs on the event loop, which reads
each replica's socket itself (``receive``, from a reader callback: the loop wakes once per record,
and no thread hands records over or competes for the GIL). A ``Ran`` record's outputs are copied
out of shared memory there, small next to the batch they answer. Two threads per replica only
wait: one for the process to exit (``watch_exit``), one for its stdout/stderr (``read_output``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modelpod import errors
from modelpod.errors import InferenceError, ModelpodError
from modelpod.model import Batch, Model
from modelpod.pod import Manifest, Signature
from modelpod.serving.forking import ForkedProcess
from modelpod.serving.messages import (
    MAX_PACKET,
    FromChild,
    Ran,
    Ready,
    RunFailed,
    StartFailed,
    ToChild,
    pack,
    unpack,
)
from modelpod.serving.shm import Reader, Writer, shm_dir
from modelpod.serving.worker import Done

log = logging.getLogger("modelpod.serving")
Split = Callable[[Batch, Sequence[Batch]], list[Batch]]

STDERR_LINES = 20
STARTING, IDLE, BUSY, STOPPING = "starting", "idle", "busy", "stopping"


@dataclass(eq=False)
class Job:
    """A batch handed to the replica set, until its ``done`` is called."""

    batch: Batch
    done: Done
    since: float
    retried: bool = False


class RemoteModel(Model):
    """The parent's stand-in for a model that lives in replicas: its signature, never a predict;
    ``split``: the cut of a merged batch's outputs per request, for a model whose outputs do not keep
    one row per input row (a detector's boxes), made from its manifest without loading it."""

    def __init__(self, name: str, signature: Signature, split: Split | None = None) -> None:
        super().__init__(None)
        self._name = name
        self.signature = signature
        self.loaded = True
        self._split = split

    @property
    def name(self) -> str:
        return self._name

    def predict(self, inputs: Any) -> Batch:  # pragma: no cover - the replicas predict
        raise InferenceError(f"model {self._name} runs in replica processes")

    def split_outputs(self, outputs: Batch, parts: Sequence[Batch]) -> list[Batch] | None:
        return self._split(outputs, parts) if self._split is not None else None


def splitter(manifest: Manifest | None) -> Split | None:
    """The output cut a pod's manifest implies: a detector's or classifier's (``modelpod.vision``)."""
    if manifest is None or not manifest.options.get("vision"):
        return None
    from modelpod.vision.task import splitter as vision_splitter

    found: Split | None = vision_splitter(manifest.options)
    return found


class Replica:
    """One child process, the server's end of its socket, and its shared-memory regions."""

    def __init__(self, rid: int, label: str) -> None:
        self.id = rid
        self.state = STARTING
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self.conn: socket.socket | None = None  # non-blocking, read by the loop
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        self.writer = Writer(f"modelpod-in-{os.getpid()}-{tag}-{rid}")
        self.reader = Reader()
        self.job: Job | None = None
        self.seq = 0
        self.batches = 0  # answered (ok or the model's error)
        self.busy_since = 0.0
        self.born = time.monotonic()
        self.ready_at: float | None = None
        self.rss = 0
        self.retiring = ""  # why it stops after its batch: "scale down", "memory", "closing"
        self.hung = False
        self.start_error = ""
        self.tail: deque[str] = deque(maxlen=STDERR_LINES)
        self.output: threading.Thread | None = None
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)

    def send(self, record: ToChild) -> None:
        """One record to the child (``OSError`` once its socket is gone)."""
        if self.conn is None:
            raise OSError("the replica's socket is closed")
        self.conn.send(pack(record))

    def receive(self) -> tuple[FromChild, Batch | None] | None:
        """The next record waiting on the socket and, for ``Ran``, its outputs (copied); None when
        nothing waits. ``EOFError`` once the child's end is closed; ``ValueError`` (or another
        ``Exception``) for a record that cannot be read."""
        conn = self.conn
        if conn is None:
            raise EOFError
        try:
            n = conn.recv_into(self._buf, MAX_PACKET, socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:  # reset: the child is gone
            raise EOFError from exc
        if n == 0:
            raise EOFError
        if n > MAX_PACKET:
            raise ValueError(f"a record of {n} bytes: more than {MAX_PACKET}")
        msg = unpack(self._view[:n])
        if type(msg) is Ran:
            return msg, self.reader.read(msg.region, msg.tensors, copy=True)
        if not isinstance(msg, (Ready, StartFailed, RunFailed)):
            raise ValueError(f"not a record from a replica: {type(msg).__name__}")
        return msg, None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cleanup(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.writer.close()
        self.reader.close()
        if self.pid is not None:  # output regions the child made and never told us about
            for path in glob.glob(str(shm_dir() / f"modelpod-out-{self.pid}-*")):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"Replica({self.id}, pid={self.pid}, {self.state})"


def watch_exit(r: Replica, loop: asyncio.AbstractEventLoop, on_exit: Callable[[Replica, int], None]) -> None:
    """Wait (on its own thread) for the replica's process to exit, then report it to the loop."""
    assert r.proc is not None
    code = r.proc.wait()
    if r.output is not None:
        r.output.join(2.0)  # its last stderr lines are the reason a start failed
    with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone
        loop.call_soon_threadsafe(on_exit, r, code)


def read_output(r: Replica) -> None:
    """The child's stdout and stderr: passed on to ours, the last lines kept for errors."""
    proc = r.proc
    assert proc is not None and proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            r.tail.append(line)
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")
    finally:
        proc.stdout.close()


def error_of(msg: RunFailed) -> ModelpodError:
    """The model's error as the child mapped it (a 400 stays a 400, a 500 keeps its detail for the log)."""
    cls = getattr(errors, msg.error, None)
    if cls is InferenceError or not (isinstance(cls, type) and issubclass(cls, ModelpodError)):
        return InferenceError(msg.message, detail=msg.detail)
    try:
        made: ModelpodError = cls(msg.message)
    except TypeError:
        return InferenceError(msg.message, detail=msg.detail)
    return made


def exit_text(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (kill -9 or the OOM killer)" if -code == signal.SIGKILL else "")
    return f"exited with status {code}"
