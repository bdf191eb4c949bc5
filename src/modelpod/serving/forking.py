"""The server's end of a model's template process (``serving/replica_template.py``): replicas by fork.

``Template`` starts the template once per replica set (with the replica's launch: interpreter and
environment), hands it the ``Start`` record, and asks it for one fork per replica. A forked replica is
the template's child, not the server's, so ``ForkedProcess`` stands in for ``subprocess.Popen``: its
pid comes with the ``Forked`` record, its exit status with ``Exited`` (the template reaps), its
output through a pipe of its own. A template that dies takes its replicas with it (they watch their
parent); their exits are reported as SIGKILL and the next replica starts a new template.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import IO

from modelpod.serving.launch import Launch
from modelpod.serving.messages import Exited, Fork, Forked, Start

log = logging.getLogger("modelpod.serving")

TEMPLATE_MODULE = "modelpod.serving.replica_template"
MAX_RECORD = 1 << 16
MATH_THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def math_threads(replicas: int, env: Mapping[str, str]) -> dict[str, str]:
    """The math libraries' thread counts for the replicas of a model that may run ``replicas`` of them:
    the cores this server may use, shared out (at least one each), so that replicas do not fight over
    cores with pools of their own (OpenMP's threads spin while they wait); nothing where the
    environment already says, or for one replica."""
    if replicas <= 1 or any(name in env for name in MATH_THREADS):
        return {}
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this system
        cores = os.cpu_count() or 1
    count = str(max(1, cores // replicas))
    return {name: count for name in MATH_THREADS}


class ForkedProcess:
    """A replica forked by the template, with the part of ``Popen``'s interface the replica set uses."""

    def __init__(self, stdout: IO[bytes]) -> None:
        self.stdout: IO[bytes] | None = stdout
        self.pid: int | None = None
        self.returncode: int | None = None
        self._exited = threading.Event()
        self._kill_when_forked = False
        self._lock = threading.Lock()

    def forked(self, pid: int) -> None:
        """Its pid: from the template's ``Forked`` record or the replica's own ``Ready``, whichever
        reaches the server first (they come on two sockets, read by two threads)."""
        with self._lock:
            if self.pid is not None:
                return
            self.pid = pid
            kill, self._kill_when_forked = self._kill_when_forked, False
        if kill:
            self.send_signal(signal.SIGKILL)

    def exited(self, code: int) -> None:
        with self._lock:
            if self.returncode is None:
                self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("replica", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is not None:
                return  # reaped: the pid may be another process's by now
            if self.pid is None:
                self._kill_when_forked = self._kill_when_forked or sig == signal.SIGKILL
                return
            pid = self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Child:
    """A template forked from this process (``Template(..., here=True)``): ``Popen``'s part it uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("template", timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode


class Template:
    """One template process; ``fork`` returns a replica's process and the server's end of its socket.

    Started as a fresh interpreter with the launch's Python and environment, or (``here``: the
    server's own interpreter, while this process is still single-threaded) forked from this process,
    which has imported modelpod and numpy already: no interpreter start, no second import of them."""

    def __init__(self, launch: Launch, start: Start, label: str, replicas: int = 1, *, here: bool = False) -> None:
        self.label = label
        self.launch = launch
        self.start = start
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, **launch.env}
        changes = math_threads(replicas, env)
        try:
            if here:
                self.proc: subprocess.Popen[bytes] | _Child = _Child(_fork_here(theirs, ours, changes))
            else:
                self.proc = subprocess.Popen([launch.python, "-m", TEMPLATE_MODULE, "--fd", str(theirs.fileno())],
                                             pass_fds=(theirs.fileno(),), env={**env, **changes},
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.alive = True
        self._lock = threading.Lock()
        self._pending: dict[int, ForkedProcess] = {}  # replica id -> not yet forked
        self._children: dict[int, ForkedProcess] = {}  # pid -> running
        self._reading = False  # the reader starts with the first fork: until then no thread (see early)
        self.sock.send(pickle.dumps(start, protocol=pickle.HIGHEST_PROTOCOL))

    def fork(self, replica: int) -> tuple[ForkedProcess, socket.socket]:
        """Ask for replica ``replica``; it runs once the template has preloaded (the socket queues).
        Returns its process and the server's end of its socket (``SOCK_SEQPACKET``: one record a packet)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        proc = ForkedProcess(os.fdopen(out_r, "rb"))
        try:
            with self._lock:
                if not self.alive:
                    raise OSError("the template process is gone")
                self._pending[replica] = proc
                if not self._reading:
                    self._reading = True
                    threading.Thread(target=self._read, daemon=True, name=f"modelpod-template-{self.label}").start()
            socket.send_fds(self.sock, [pickle.dumps(Fork(replica))], [theirs.fileno(), out_w])
        except OSError:
            with self._lock:
                self._pending.pop(replica, None)
            ours.close()
            assert proc.stdout is not None
            proc.stdout.close()
            raise
        finally:
            theirs.close()
            os.close(out_w)
        return proc, ours

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(MAX_RECORD)
                if not data:
                    break
                record = pickle.loads(data)
                with self._lock:
                    if isinstance(record, Forked):
                        proc = self._pending.pop(record.replica, None)
                        if proc is not None:
                            self._children[record.pid] = proc
                    elif isinstance(record, Exited):
                        proc = self._children.pop(record.pid, None)
                if isinstance(record, Forked) and proc is not None:
                    proc.forked(record.pid)
                elif isinstance(record, Exited) and proc is not None:
                    proc.exited(record.code)
        except (OSError, pickle.UnpicklingError, EOFError):
            pass
        with self._lock:
            self.alive = False
            orphans = [*self._pending.values(), *self._children.values()]
            self._pending.clear()
            self._children.clear()
        for proc in orphans:  # they exit on their own (their parent is gone): report them killed
            proc.kill()
            proc.exited(-signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def serves(self, launch: Launch, start: Start) -> bool:
        """Whether this template is alive and forks what ``launch`` and ``start`` ask for."""
        return self.alive and self.proc.poll() is None and self.launch == launch and self.start == start

    def close(self) -> None:
        """Stop the template (after its replicas: they exit when it does)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def fork_running(body: Callable[[], int]) -> int:
    """Fork; the child runs ``body`` and exits with its status (1, with the traceback on stderr, if it
    raises), never returning. Returns the child's pid, here in the parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = body()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork_here(theirs: socket.socket, ours: socket.socket, env: Mapping[str, str]) -> int:
    """Fork a template from this process on socket ``theirs``; returns its pid (here, in the parent)."""

    def template() -> int:
        os.setsid()  # as a started template: its own session, out of the terminal's ^C
        ours.close()
        for other in _early.values():
            other.sock.close()  # the server's ends of the templates forked before this one
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(env)
        from modelpod.serving import replica_template

        return replica_template.serve(theirs)

    return fork_running(template)


# Templates forked by ``start_early`` and not yet taken by their replica set, by what they load.
_early: dict[Start, Template] = {}


def start_early(start: Start, label: str, replicas: int) -> None:
    """Fork the template of a model that will run in replicas of the server's own environment now,
    while the server is still starting (``modelpod serve``, before its event loop and threads): the
    template's imports and load run while the server imports, binds and starts; ``take`` hands it to
    the replica set. Refused (the set starts its own later) once this process runs other threads."""
    if start in _early or threading.active_count() != 1 or not hasattr(os, "fork"):
        return
    try:
        _early[start] = Template(Launch(why="server environment"), start, label, replicas, here=True)
    except OSError as exc:
        log.warning("could not start a replica template early", extra={"fields": {"model": label, "error": str(exc)}})


def take(launch: Launch, start: Start) -> Template | None:
    """The template ``start_early`` forked for ``start``, if it serves ``launch`` and is alive."""
    template = _early.pop(start, None)
    if template is None:
        return None
    if template.serves(launch, start):
        return template
    template.close()
    return None
