"""A replica process: loads one model and runs the batches its server sends, one at a time.

Started by ``serving/replicas.py`` as ``python -m modelpod.serving.replica_child --fd N`` (see
``serving/launch.py``); ``N`` is its end of a socket pair. It reads the ``Start`` record, loads the
pod (verified, as the server would), answers ``Ready`` (or ``StartFailed``, and exits 3), then
serves ``Run`` records until ``Stop`` or the socket closes. Inputs are read in place from the
server's shared-memory region; outputs are written into the child's own. The model's errors are
mapped exactly as in thread mode (``worker.model_error``) and sent back as ``RunFailed``.
Tracebacks go to stderr, which the server keeps the last lines of.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from modelpod.errors import InferenceError, ModelpodError
from modelpod.model import PARAMETERS, Model
from modelpod.serving.messages import Ran, Ready, Run, RunFailed, Start, StartFailed, Stop
from modelpod.serving.shm import Reader, Writer
from modelpod.serving.worker import ModelWorker, rss_bytes

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


def serve(conn: Connection) -> int:
    start = conn.recv()
    if not isinstance(start, Start):
        return 2
    t0 = time.perf_counter()
    try:
        kept = PRELOADED_MODEL
        model = kept[1] if kept and kept[0] == (start.home, start.ref, start.path) else load(start)
    except BaseException as exc:  # whatever custom code raises at import or load
        detail = traceback.format_exc()
        sys.stderr.write(detail)
        sys.stderr.flush()
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}", detail))
        return 3
    worker = ModelWorker(model, start.label)
    takes = bool(getattr(model, "takes_parameters", False))
    per_row = takes and bool(getattr(model, "row_parameters", False))
    conn.send(Ready(os.getpid(), time.perf_counter() - t0, rss_bytes(), takes, per_row))
    reader, writer = Reader(), Writer(f"modelpod-out-{os.getpid()}")
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return 0
            if isinstance(msg, Stop):
                return 0
            if not isinstance(msg, Run):
                continue
            conn.send(_run(worker, msg, reader, writer, takes))
    finally:
        writer.close()
        reader.close()


def _run(worker: ModelWorker, msg: Run, reader: Reader, writer: Writer, takes: bool) -> Ran | RunFailed:
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
        return RunFailed(msg.seq, type(exc).__name__, exc.message, detail, rss_bytes())
    except BaseException as exc:  # pragma: no cover - worker.call maps the model's own errors
        return RunFailed(msg.seq, "InferenceError", f"model {worker.label} failed", f"{type(exc).__name__}: {exc}",
                         rss_bytes())
    return Ran(msg.seq, region, refs, rss_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelpod.serving.replica_child")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the server")
    args = parser.parse_args(argv)
    return run(args.fd)


def run(fd: int) -> int:
    """Serve the server on socket ``fd`` (a fresh interpreter, or a fork of the template)."""
    watch_parent()
    conn = Connection(fd)
    try:
        return serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
