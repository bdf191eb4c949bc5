"""A replica process: loads one model and runs the batches its server sends, one at a time.

Forked from its model's template (``serving/replica_template.py``), or started as ``python -m
modelpod.serving.replica_child --fd N`` (see ``serving/launch.py``); ``N`` is its end of a
``SOCK_SEQPACKET`` socket pair, one record per packet (``messages.pack``). It reads the ``Start``
record, loads the pod (verified, as the server would), answers ``Ready`` (or ``StartFailed``, and
exits 3), then serves ``Run`` records until ``Stop`` or the socket closes. Inputs are read in place from the
server's shared-memory region; outputs are written into the child's own. The model's errors are
mapped exactly as in thread mode (``worker.model_error``) and sent back as ``RunFailed``.
Tracebacks go to stderr, which the server keeps the last lines of.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from modelpod.errors import InferenceError, ModelpodError
from modelpod.model import PARAMETERS, Model
from modelpod.serving.messages import (
    MAX_PACKET,
    FromChild,
    Ran,
    Ready,
    Run,
    RunFailed,
    Start,
    StartFailed,
    Stop,
    ToChild,
    clip,
    pack,
    unpack,
)
from modelpod.serving.shm import Reader, Writer
from modelpod.serving.worker import ModelWorker

if TYPE_CHECKING:
    from modelpod.pod import Pod

# Set in a template process before it forks replicas: (home, ref, path) -> the verified pod.
PRELOADED: tuple[tuple[str, str | None, str | None], Pod] | None = None
PRELOADED_MODEL: tuple[tuple[str, str | None, str | None], Model] | None = None  # loaded, no threads


def open_pod(start: Start) -> Pod:
    """The pod ``start`` names, verified (once: a replica forked from its template reuses its pod)."""
    from modelpod.pod import Pod
    from modelpod.store import Store

    if PRELOADED and PRELOADED[0] == (start.home, start.ref, start.path):
        return PRELOADED[1]
    if start.path is not None:
        pod = Pod.open(Path(start.path), verify=True)
    else:
        assert start.ref is not None
        pod = Store(Path(start.home)).open(start.ref, verify=True)
    return pod


def load(start: Start) -> Model:
    """The model ``start`` names, loaded as the registry loads it in thread mode."""
    from modelpod.frameworks import require

    pod = open_pod(start)
    model = require(pod.manifest.framework).load(pod)
    if not getattr(model, "loaded", False):
        model.replica = True
        model.load()
    return model


def watch_parent() -> None:
    """Exit when the server is gone, even while a predict hangs (EOF is only seen between batches)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="modelpod-parent-watch", daemon=True).start()


class Channel:
    """This end of the socket: whole records in and out, one packet each."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)

    def recv(self) -> ToChild | None:
        """The next record, or None once the server closed its end."""
        n = self.sock.recv_into(self._buf, MAX_PACKET, socket.MSG_TRUNC)
        if n == 0:
            return None
        if n > MAX_PACKET:
            raise ValueError(f"a record of {n} bytes: more than {MAX_PACKET}")
        record = unpack(self._view[:n])
        if not isinstance(record, (Start, Run, Stop)):
            raise ValueError(f"not a record for a replica: {type(record).__name__}")
        return record

    def send(self, record: FromChild) -> None:
        self.sock.send(pack(record))


class Rss:
    """This process's resident set size, read from /proc with one ``pread`` a batch (0 without /proc)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        try:
            self.fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)  # opened here: this pid's
        except OSError:
            self.fd = None

    def __call__(self) -> int:
        if self.fd is None:
            return 0
        try:
            return int(os.pread(self.fd, 128, 0).split()[1]) * self.page
        except (OSError, ValueError, IndexError):
            return 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def serve(conn: Channel) -> int:
    start = conn.recv()
    if not isinstance(start, Start):
        return 2
    rss = Rss()
    t0 = time.perf_counter()
    try:
        kept = PRELOADED_MODEL
        model = kept[1] if kept and kept[0] == (start.home, start.ref, start.path) else load(start)
    except BaseException as exc:  # whatever custom code raises at import or load
        detail = traceback.format_exc()
        sys.stderr.write(detail)
        sys.stderr.flush()
        conn.send(StartFailed(clip(f"{type(exc).__name__}: {exc}"), clip(detail)))
        return 3
    worker = ModelWorker(model, start.label)
    takes = bool(getattr(model, "takes_parameters", False))
    per_row = takes and bool(getattr(model, "row_parameters", False))
    conn.send(Ready(os.getpid(), time.perf_counter() - t0, rss(), takes, per_row))
    reader, writer = Reader(), Writer(f"modelpod-out-{os.getpid()}")
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return 0
            if msg is None or isinstance(msg, Stop):
                return 0
            if not isinstance(msg, Run):
                continue
            conn.send(_run(worker, msg, reader, writer, takes, rss))
    finally:
        writer.close()
        reader.close()
        rss.close()


def _run(worker: ModelWorker, msg: Run, reader: Reader, writer: Writer, takes: bool, rss: Rss) -> Ran | RunFailed:
    try:
        inputs = reader.read(msg.region, msg.tensors, copy=False)
        if not takes:
            inputs.pop(PARAMETERS, None)
        out = worker.call(inputs)
        del inputs
        region, refs = writer.write(out)
        del out
    except ModelpodError as exc:
        detail = exc.detail if isinstance(exc, InferenceError) else ""
        return RunFailed(msg.seq, type(exc).__name__, clip(exc.message), clip(detail), rss())
    except BaseException as exc:  # pragma: no cover - worker.call maps the model's own errors
        return RunFailed(msg.seq, "InferenceError", f"model {worker.label} failed",
                         clip(f"{type(exc).__name__}: {exc}"), rss())
    return Ran(msg.seq, region, refs, rss())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelpod.serving.replica_child")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the server")
    args = parser.parse_args(argv)
    return run(args.fd)


def run(fd: int) -> int:
    """Serve the server on socket ``fd`` (a fresh interpreter, or a fork of the template)."""
    watch_parent()
    sock = socket.socket(fileno=fd)
    try:
        return serve(Channel(sock))
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
