"""Replica: one worker process as the server sees it, and the threads that read its socket and output.

``ReplicaSet`` (``serving/replicas.py``) owns the replicas and runs on the event loop; the two
threads here block on the child's socket and on its stdout/stderr, and hand every record to the
loop (``call_soon_threadsafe``). A ``Ran`` record's outputs are copied out of shared memory on the
reader thread, so the loop never copies tensors back.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from modelpod import errors
from modelpod.errors import InferenceError, ModelpodError
from modelpod.model import Batch, Model
from modelpod.pod import Manifest, Signature
from modelpod.serving.forking import ForkedProcess
from modelpod.serving.messages import Ran, RunFailed
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
        self.conn: Connection | None = None
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cleanup(self) -> None:
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


def read_messages(r: Replica, loop: asyncio.AbstractEventLoop, label: str,
                  on_message: Callable[[Replica, Any, Batch | None], None],
                  on_exit: Callable[[Replica, int], None]) -> None:
    """The replica's socket, read on its own thread; each record goes to the loop, then its exit."""
    conn = r.conn
    assert conn is not None and r.proc is not None
    try:
        while True:
            msg = conn.recv()
            outputs = r.reader.read(msg.region, msg.tensors, copy=True) if isinstance(msg, Ran) else None
            loop.call_soon_threadsafe(on_message, r, msg, outputs)
    except (EOFError, OSError, ValueError):
        pass
    except Exception as exc:  # a record we cannot read: treat the replica as broken
        log.error("bad record from a replica", extra={"fields": {"model": label, "error": repr(exc)}})
        r.kill()
    finally:
        conn.close()
    try:
        code = r.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        r.proc.kill()
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
