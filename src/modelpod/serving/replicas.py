"""ReplicaSet: one model version in worker processes, fed by the server's batcher, scaled and healed.

It has the worker interface the batcher calls (``submit``/``predict``/``close``, as ``ModelWorker``),
so batching, deadlines and metrics stay the server's. A batch goes to an idle replica: its tensors
are written into that replica's shared-memory region and a ``Run`` record names them
(``serving/messages.py``, ``serving/shm.py``); with no idle replica it is held, in order.

Healing: a replica that dies (crash, OOM kill, ``kill -9``) is replaced at once, with an
exponential backoff while it keeps dying young; the batch it held runs once more on another
replica (inference is idempotent). A replica busy past the model's timeout is killed and replaced
(its batch has already had its 504). A replica whose RSS passes ``max_memory`` after a batch is
retired and replaced between batches. A replica that cannot start (an import error in custom code)
is retried with backoff, and after ``MAX_START_FAILURES`` with none running the model is marked
failed with the child's last stderr lines (``on_failed``), never restarted in a loop.

Scaling: every ``TICK_S`` (and on each batch) the autoscaler (``serving/autoscale.py``) sets the
target from the in-flight batches; extra replicas finish their batch and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from modelpod.errors import InferenceError, InferenceTimeoutError, ModelNotReadyError, ModelpodError
from modelpod.model import Batch
from modelpod.serving.autoscale import Autoscaler, demand_of
from modelpod.serving.forking import ForkedProcess, Template, take
from modelpod.serving.launch import Launch
from modelpod.serving.messages import Ran, Ready, Run, RunFailed, Start, StartFailed, Stop
from modelpod.serving.replica import (
    BUSY,
    IDLE,
    STARTING,
    STOPPING,
    Job,
    RemoteModel,
    Replica,
    error_of,
    exit_text,
    read_output,
    watch_exit,
)
from modelpod.serving.scaling import ReplicaPolicy
from modelpod.serving.worker import Done, awaited

log = logging.getLogger("modelpod.serving")

TICK_S = 0.1
MAX_START_FAILURES = 3
HANGUP_S = 30.0  # a child that closed its socket but has not exited by then is killed


@dataclass(frozen=True)
class ReplicaHooks:
    """What the registry hands in: metrics children and callbacks (all called on the loop)."""

    on_failed: Callable[[str], None] = lambda reason: None
    on_scale: Callable[[str], None] = lambda direction: None  # "up" / "down"
    on_restart: Callable[[str], None] = lambda reason: None  # "crashed", "killed", "hung", "memory"
    queued_rows: Callable[[], int] = lambda: 0  # rows the batcher holds that no batch has taken yet
    wake: Callable[[], None] = lambda: None  # a replica freed up: let the batcher dispatch


class ReplicaSet:
    def __init__(self, label: str, start: Start, launch: Launch, policy: ReplicaPolicy, timeout_s: float,
                 max_batch_rows: int, hooks: ReplicaHooks | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.start_record = start
        self.launch = launch
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_batch_rows = max_batch_rows
        self.hooks = hooks or ReplicaHooks()
        self.autoscaler = Autoscaler(policy, clock)
        self.clock = clock
        self.replicas: list[Replica] = []
        self.template: Template | None = None  # forks the replicas (serving/forking.py)
        self.held: deque[Job] = deque()
        self.target = 0
        self.takes_parameters = False
        self.model: RemoteModel | None = None  # the parent's stand-in, told what the child learnt
        self.failed = ""
        self.closed = False
        self._next_id = 0
        self._start_failures = 0
        self._crash_streak = 0
        self._not_before = 0.0  # no new replica before this (backoff)
        self._retry_timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up: asyncio.Future[None] | None = None
        self._gone: asyncio.Event | None = None

    # -- the worker interface ---------------------------------------------------------------------
    def slots(self) -> int:
        """Batches the batcher may hand over at once: one per serving replica (one while none is)."""
        return max(1, sum(1 for r in self.replicas if r.state in (IDLE, BUSY) and not r.retiring))

    def submit(self, batch: Batch, done: Done, loop: asyncio.AbstractEventLoop) -> None:
        """Run ``batch`` on a replica (held until one is free); ``done`` is called on ``loop`` once."""
        if self.failed:
            raise ModelNotReadyError(f"model {self.label} failed: {self.failed}")
        if self.closed:
            raise ModelNotReadyError(f"model {self.label}: the replicas are stopping")
        self.held.append(Job(batch, done, loop.time()))
        if self.target == 0:
            self._autoscale()
        self._dispatch()

    async def predict(self, batch: Batch) -> Batch:
        return await awaited(self.submit, batch)

    # -- starting and stopping --------------------------------------------------------------------
    async def start(self) -> None:
        """Start the first replicas (``min``, and at least one even with ``min: 0``, so a broken pod
        fails its load) and return once they serve; raise ``ModelNotReadyError`` once it is failed."""
        loop = self._loop = asyncio.get_running_loop()
        self._up = loop.create_future()
        self._gone = asyncio.Event()
        self.target = max(1, self.policy.min)
        self._reconcile()
        self._tick = loop.call_later(TICK_S, self._on_tick)
        await asyncio.shield(self._up)

    def close(self) -> None:
        """Refuse new batches, fail the held ones, and stop every replica after its batch."""
        if self.closed:
            return
        self.closed = True
        for timer in (self._tick, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._fail_held(ModelNotReadyError(f"model {self.label} is unloaded"))
        for r in list(self.replicas):
            self._retire(r, "closing")
        if not self.replicas:
            self._all_gone()

    async def wait_closed(self, timeout_s: float = 10.0) -> None:
        """After ``close``: wait for the replicas to exit; kill what is left after ``timeout_s``."""
        if self._gone is None or not self.replicas:
            return
        try:
            await asyncio.wait_for(self._gone.wait(), timeout_s)
        except TimeoutError:
            for r in list(self.replicas):
                log.warning("replica did not stop in time: killed", extra={"fields": {
                    "model": self.label, "replica": r.id, "pid": r.pid}})
                self._kill(r)

    def _all_gone(self) -> None:
        """Closed and every replica exited: the template goes too."""
        if self.template is not None:
            self.template.close()
            self.template = None
        if self._gone is not None:
            self._gone.set()

    def ready_count(self) -> int:
        return sum(1 for r in self.replicas if r.state in (IDLE, BUSY))

    def describe(self) -> list[dict[str, Any]]:
        return [{"replica": r.id, "pid": r.pid, "state": r.state, "rss_bytes": r.rss, "batches": r.batches}
                for r in self.replicas]

    def memory_bytes(self) -> int:
        return sum(r.rss for r in self.replicas)

    # -- dispatching ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self.held:
            replica = next((r for r in self.replicas if r.state == IDLE and not r.retiring), None)
            if replica is None:
                return
            self._send(replica, self.held.popleft())

    def _send(self, r: Replica, job: Job) -> None:
        assert self._loop is not None
        try:
            region, refs = r.writer.write(job.batch)
        except OSError as exc:  # /dev/shm full: this batch fails (on the next turn), the replica stays
            self._loop.call_soon(job.done, None, InferenceError(
                f"model {self.label}: no shared memory for the batch", detail=f"{type(exc).__name__}: {exc}"))
            return
        r.seq += 1
        r.job, r.state, r.busy_since = job, BUSY, self._loop.time()
        with contextlib.suppress(OSError):  # it died meanwhile: its exit puts the job back
            r.send(Run(r.seq, region, refs))

    def _finish(self, r: Replica, out: Batch | None, err: BaseException | None, rss: int) -> None:
        job, r.job = r.job, None
        r.rss = rss
        r.state = IDLE
        r.batches += 1
        if self.policy.max_memory is not None and rss > self.policy.max_memory and not r.retiring:
            log.warning("replica over its memory limit: recycling it", extra={"fields": {
                "model": self.label, "replica": r.id, "rss_bytes": rss, "max_memory": self.policy.max_memory}})
            self.hooks.on_restart("memory")
            self._retire(r, "memory")
            self._reconcile()
        elif r.retiring:
            self._stop(r)
        if job is not None:
            job.done(out, err)
        self._dispatch()
        self.hooks.wake()

    # -- records from the replicas (read on the loop) ---------------------------------------------
    def _readable(self, r: Replica, drain: bool = False) -> None:
        """The loop's reader callback for a replica's socket: the next record (the poll is level
        triggered: it calls again while more wait); with ``drain``, every record waiting."""
        while True:
            try:
                got = r.receive()
            except EOFError:
                self._hangup(r)
                return
            except Exception as exc:  # a record we cannot read: treat the replica as broken
                log.error("bad record from a replica", extra={"fields": {"model": self.label, "error": repr(exc)}})
                r.kill()
                self._hangup(r)
                return
            if got is None:
                return
            self._message(r, *got)
            if not drain:
                return

    def _hangup(self, r: Replica) -> None:
        """The child's end closed (it exits): stop reading; kill it if it lingers."""
        if r.conn is None:
            return
        with contextlib.suppress(Exception):  # a closed loop, or a reader already gone
            if self._loop is not None:
                self._loop.remove_reader(r.conn.fileno())
        r.conn.close()
        r.conn = None
        if self._loop is not None and r.proc is not None and r.proc.poll() is None:
            self._loop.call_later(HANGUP_S, r.kill)

    def _message(self, r: Replica, msg: Any, outputs: Batch | None) -> None:
        if type(msg) is Ran:
            if r.job is not None and msg.seq == r.seq:
                if r.writer.region is not None:
                    r.writer.region.unlink()  # the child has mapped it: the name is not needed any more
                self._finish(r, outputs, None, msg.rss_bytes)
        elif isinstance(msg, Ready):
            if isinstance(r.proc, ForkedProcess):
                r.proc.forked(msg.pid)  # Ready can overtake the template's Forked record
            r.state = IDLE if not r.retiring else STOPPING
            r.ready_at, r.rss = time.monotonic(), msg.rss_bytes
            self.takes_parameters = msg.takes_parameters
            if self.model is not None:
                self.model.takes_parameters = msg.takes_parameters
                self.model.row_parameters = msg.row_parameters
            self._start_failures = 0
            log.info("replica ready", extra={"fields": {"model": self.label, "replica": r.id, "pid": msg.pid,
                                                        "seconds": round(msg.load_seconds, 4),
                                                        "rss_bytes": msg.rss_bytes}})
            if r.retiring:
                self._stop(r)
            if self.ready_count() >= self.target:
                self._started()
            self._dispatch()
            self.hooks.wake()
        elif isinstance(msg, StartFailed):
            r.start_error = msg.error
        elif isinstance(msg, RunFailed) and r.job is not None and msg.seq == r.seq:
            self._finish(r, None, error_of(msg), msg.rss_bytes)

    def _exited(self, r: Replica, code: int) -> None:
        if r in self.replicas:
            self.replicas.remove(r)  # first: nothing is dispatched to it while its last records are read
        if r.conn is not None:  # what it said before it died comes first (a Ran, a StartFailed)
            self._readable(r, drain=True)
            self._hangup(r)
        r.cleanup()
        how = exit_text(code)
        job, r.job = r.job, None
        if r.ready_at is None and not r.retiring:
            self._start_failed(r, how)
        elif r.retiring and not r.hung:
            log.info("replica stopped", extra={"fields": {"model": self.label, "replica": r.id, "why": r.retiring}})
        else:
            reason = "hung" if r.hung else ("killed" if code < 0 else "crashed")
            log.error("replica died", extra={"fields": {"model": self.label, "replica": r.id, "pid": r.pid,
                                                        "exit": how, "reason": reason,
                                                        "stderr": "\n".join(r.tail)}})
            self.hooks.on_restart(reason)
            # Backoff is for a crash loop: replicas that die before answering anything. One that
            # served (then was killed, or hit a bad batch) is replaced at once.
            self._crash_streak = 0 if r.batches > 0 else self._crash_streak + 1
            if self._crash_streak > 1:
                self._backoff(min(10.0, 0.25 * 2 ** (self._crash_streak - 2)))
        if job is not None:
            if r.hung:
                job.done(None, InferenceTimeoutError(f"model {self.label}: no answer within {self.timeout_s:g}s"))
            elif not job.retried and not self.closed:
                job.retried = True
                self.held.appendleft(job)  # runs again on the next free replica
            else:
                job.done(None, InferenceError(f"model {self.label}: the replica running this batch died ({how})"))
        if self.closed and not self.replicas:
            self._all_gone()
        self._reconcile()
        self._dispatch()
        self.hooks.wake()

    def _start_failed(self, r: Replica, how: str) -> None:
        self._start_failures += 1
        lines = "\n".join(list(r.tail)[-8:])
        why = r.start_error or f"the replica process {how} before it was ready"
        reason = f"replica could not start: {why}" + (f"\n{lines}" if lines else "")
        log.error("replica could not start", extra={"fields": {
            "model": self.label, "replica": r.id, "attempt": self._start_failures, "error": why,
            "stderr": "\n".join(r.tail)}})
        if self._start_failures >= MAX_START_FAILURES and self.ready_count() == 0:
            self._mark_failed(reason)
        else:
            if self._start_failures >= MAX_START_FAILURES:
                self._started()  # serve with the replicas that did start; the others keep being retried
            self._backoff(min(30.0, 0.5 * 2 ** (self._start_failures - 1)))

    def _started(self) -> None:
        if self._up is not None and not self._up.done():
            self._up.set_result(None)

    def _mark_failed(self, reason: str) -> None:
        self.failed = reason
        log.error("model failed: its replicas cannot start", extra={"fields": {
            "model": self.label, "attempts": self._start_failures, "reason": reason}})
        self._fail_held(ModelNotReadyError(f"model {self.label} failed: {reason}"))
        if self._up is not None and not self._up.done():
            self._up.set_exception(ModelNotReadyError(f"model {self.label} failed: {reason}"))
            self._up.exception()  # retrieved here too: no "never retrieved" warning when nobody waits
        self.hooks.on_failed(reason)

    def _fail_held(self, error: ModelpodError) -> None:
        while self.held:
            self.held.popleft().done(None, error)

    # -- keeping the count --------------------------------------------------------------------------
    def _backoff(self, delay: float) -> None:
        self._not_before = max(self._not_before, time.monotonic() + delay)

    def _reconcile(self) -> None:
        """Start or retire replicas until the live ones match the target."""
        if self.closed or self.failed:
            return
        live = [r for r in self.replicas if not r.retiring]
        extra = len(live) - self.target
        if extra > 0:
            # Retire the youngest first (still starting, then idle), busy ones after their batch.
            order = {STARTING: 0, IDLE: 1, BUSY: 2}
            for r in sorted(live, key=lambda r: (order.get(r.state, 3), -r.id))[:extra]:
                self._retire(r, "scale down")
            return
        if extra == 0:
            return
        wait = self._not_before - time.monotonic()
        if wait > 0:
            if self._retry_timer is None and self._loop is not None:
                self._retry_timer = self._loop.call_later(wait, self._retry)
            return
        for _ in range(-extra):
            self._spawn()

    def _retry(self) -> None:
        self._retry_timer = None
        self._reconcile()

    def _retire(self, r: Replica, why: str) -> None:
        if r.retiring:
            return
        r.retiring = why
        if r.state in (IDLE, STARTING):
            self._stop(r)

    def _stop(self, r: Replica) -> None:
        """Ask the child to exit (it is idle); a child still starting is killed instead."""
        if r.state == STARTING:
            self._kill(r)
            return
        r.state = STOPPING
        with contextlib.suppress(OSError):
            r.send(Stop())

    def _kill(self, r: Replica) -> None:
        r.kill()

    def _spawn(self) -> None:
        assert self._loop is not None
        r = Replica(self._next_id, self.label)
        self._next_id += 1
        self.replicas.append(r)
        try:
            if self.template is None or not self.template.alive:
                if self.template is not None:
                    self.template.close()  # it died (its replicas with it): a new one preloads again
                    self.template = None
                self.template = (take(self.launch, self.start_record)  # forked while the server started
                                 or Template(self.launch, self.start_record, self.label, self.policy.max))
            r.proc, r.conn = self.template.fork(r.id)
        except OSError as exc:
            r.start_error = f"cannot run {self.launch.python}: {exc.strerror or exc}"
            self._loop.call_soon(self._exited, r, 127)
            return
        r.conn.setblocking(False)
        r.send(Start(self.label, self.start_record.home, self.start_record.ref, self.start_record.path, r.id))
        loop = self._loop
        loop.add_reader(r.conn.fileno(), self._readable, r)
        r.output = threading.Thread(target=read_output, args=(r,), daemon=True,
                                    name=f"modelpod-replica-out-{self.label}-{r.id}")
        r.output.start()
        threading.Thread(target=watch_exit, args=(r, loop, self._exited), daemon=True,
                         name=f"modelpod-replica-{self.label}-{r.id}").start()
        log.info("replica starting", extra={"fields": {"model": self.label, "replica": r.id, "pid": r.pid,
                                                       "python": self.launch.python, "env": self.launch.why}})

    # -- the periodic check ---------------------------------------------------------------------------
    def _on_tick(self) -> None:
        assert self._loop is not None
        self._tick = self._loop.call_later(TICK_S, self._on_tick)
        now = self._loop.time()
        for r in self.replicas:
            if r.state == BUSY and not r.hung and now - r.busy_since > self.timeout_s:
                r.hung = True
                log.error("replica hung past the model's timeout: killing it", extra={"fields": {
                    "model": self.label, "replica": r.id, "pid": r.pid, "timeout_s": self.timeout_s}})
                self._kill(r)
        while self.held and now - self.held[0].since > self.timeout_s:
            self.held.popleft().done(None, InferenceTimeoutError(
                f"model {self.label}: no replica answered within {self.timeout_s:g}s"))
        self._autoscale()

    def demand(self) -> float:
        running = sum(1 for r in self.replicas if r.state == BUSY)
        return demand_of(running, len(self.held), self.hooks.queued_rows(), self.max_batch_rows)

    def _autoscale(self) -> None:
        if self.closed or self.failed or self._up is None or not self._up.done():
            return  # not while the first replicas start: the load waits for them
        decision = self.autoscaler.decide(self.target, self.demand())
        if decision is None:
            return
        log.info(f"scaling {decision.direction}", extra={"fields": {
            "model": self.label, "from": decision.before, "to": decision.after, "demand": decision.demand}})
        self.target = decision.after
        self.hooks.on_scale(decision.direction)
        self._reconcile()


def console_table(sets: Iterable[ReplicaSet]) -> dict[str, Any]:
    """The console's replicas table (``engine.console_sections["replicas"]``): one row per replica."""
    rows: list[list[Any]] = []
    for rs in sets:
        if rs.failed:
            rows.append([rs.label, None, None, f"failed: {rs.failed}"[:200], None, None])
        for r in rs.describe():
            rows.append([rs.label, r["replica"], r["pid"], r["state"], round(r["rss_bytes"] / 2**20, 1), r["batches"]])
    return {"title": "Replicas", "columns": ["model", "replica", "pid", "state", "rss MiB", "batches"],
            "rows": rows, "note": "The worker processes of models served in replicas (isolation: process)."}
