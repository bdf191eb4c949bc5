"""A model's template process: imports its framework and verifies its pod once, then forks replicas.

Started by ``serving/forking.py`` as ``python -m modelpod.serving.replica_template --fd N`` (the
replica's launch: interpreter and environment, ``serving/launch.py``), with ``N`` a SOCK_SEQPACKET
socket to the server, or forked from ``modelpod serve`` itself while it starts (``serve`` on that
socket: the server's environment, modelpod and numpy already imported). It reads the ``Start``
record, imports what the model's framework needs and opens the pod verified (best effort: an error
here is met again, and reported, by the replica that loads), then forks one replica per ``Fork``
record, which brings the replica's socket and output pipe as file descriptors. A replica starts from
the forked state: no interpreter start, no imports, no second hash of the weights; it loads the
model and serves (``replica_child.run``).

The template stays single-threaded in Python (it waits in ``select``): forking a process whose other
threads may hold locks is what not to do. Native threads the imports start (OpenBLAS's pool) have
their own fork handlers, as every ``multiprocessing`` fork of a numpy process relies on.
It reaps its replicas and reports each exit (``Exited``); it exits when the server's socket closes
or the server is gone, and its replicas follow (they watch their parent).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys

from modelpod.serving import replica_child
from modelpod.serving.forking import fork_running
from modelpod.serving.messages import Exited, Fork, Forked, Start

MAX_RECORD = 1 << 16


def threads() -> int:
    """OS threads of this process (1 where /proc is missing: then nothing is kept loaded)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def preload(start: Start) -> None:
    """Import the framework's runtime modules and open the pod verified, for every replica to inherit.

    A built-in framework's model is loaded here too, and kept when its load started no thread: the
    replicas then inherit it (no load at all, and its weights' pages stay shared until written).
    A load that starts threads (ONNX Runtime's pool) cannot be forked: that model is dropped, and
    every replica loads its own. Custom code (``python``) always loads in the replica: its
    ``load`` may open what must not be shared."""
    from modelpod.frameworks import require

    key = (start.home, start.ref, start.path)
    pod = replica_child.open_pod(start)
    framework = pod.manifest.framework
    adapter = require(framework)
    for name in getattr(adapter, "RUNTIME_IMPORTS", adapter.IMPORTS):
        importlib.import_module(name)
    replica_child.PRELOADED = (key, pod)
    if framework == "python":
        return
    before = threads()
    model = replica_child.load(start)
    if before and threads() <= before:
        replica_child.PRELOADED_MODEL = (key, model)
    else:
        model.unload()
        del model
        gc.collect()


def send(sock: socket.socket, record: object) -> None:
    sock.send(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))


def serve(sock: socket.socket) -> int:
    start = pickle.loads(sock.recv(MAX_RECORD))
    if not isinstance(start, Start):
        return 2
    try:
        preload(start)
    except Exception:  # the replica meets it again, and reports it as its start failure
        replica_child.PRELOADED = replica_child.PRELOADED_MODEL = None
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    parent = os.getppid()
    try:
        while os.getppid() == parent:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [], 1.0)
            if wake_r in ready:
                os.read(wake_r, 4096)
            reap(sock)
            if sock.fileno() not in ready:
                continue
            data, fds, _, _ = socket.recv_fds(sock, MAX_RECORD, 2)
            if not data:
                return 0  # the server closed its end
            record = pickle.loads(data)
            if isinstance(record, Fork) and len(fds) == 2:
                pid = fork(record, fds, (sock.fileno(), wake_r, wake_w))
                send(sock, Forked(record.replica, pid))
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return 1
    finally:
        signal.set_wakeup_fd(-1)


def reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            send(sock, Exited(pid, os.waitstatus_to_exitcode(status)))


def fork(record: Fork, fds: list[int], own: tuple[int, ...]) -> int:
    """Fork a replica on ``fds`` (its socket, its output pipe); returns its pid, here in the template."""

    def replica() -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in own:
            os.close(fd)
        os.setsid()
        conn_fd, out_fd = fds
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        return replica_child.run(conn_fd)

    return fork_running(replica)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelpod.serving.replica_template")
    parser.add_argument("--fd", type=int, required=True, help="the SOCK_SEQPACKET socket to the server")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        return serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
