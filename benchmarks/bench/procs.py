"""Server processes: launch pinned to a core in their own session, poll until they answer, measure
the memory of their process tree, and stop exactly the processes we started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No proxy, ever: every request goes straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A server exited early, never answered, or answered wrongly."""


@dataclass
class Server:
    label: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    leader_start: str = ""
    tree: dict[int, str] = field(default_factory=dict)

    def last_log_line(self) -> str:
        lines = [line.strip() for line in self.log_tail(40).splitlines() if line.strip()]
        return lines[-1][:200] if lines else "no output"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(label: str, cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path, cpu: str) -> Server:
    """Start `cmd` pinned to `cpu`, in a new session (so its group can be signalled as a whole)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *cmd],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    info = _stat(proc.pid)
    return Server(label, proc, log_path, started, leader_start=info[1] if info else "")


def post_json(url: str, body: bytes, timeout_s: float, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_first_prediction(server: Server, url: str, body: bytes, deadline_s: float,
                          headers: dict[str, str] | None = None) -> tuple[float, Any]:
    """Poll `url` until a 200 answer; return (seconds since launch, parsed JSON body).

    Between attempts we wait on the process itself, so an early exit ends the poll at once."""
    deadline = server.started_at + deadline_s
    last_error = "no attempt"
    while time.perf_counter() < deadline:
        if server.proc.poll() is not None:
            reason = f"exited with {server.proc.returncode} before answering ({server.last_log_line()})"
            raise ServerError(f"{reason}\n{server.log_tail()}")
        try:
            status, payload = post_json(url, body, timeout_s=5.0, headers=headers)
            if status == 200:
                return time.perf_counter() - server.started_at, json.loads(payload)
            last_error = f"HTTP {status}: {payload[:300]!r}"
        except (OSError, ValueError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=0.01)
    raise ServerError(
        f"no successful prediction within {deadline_s:.0f}s ({last_error})\n{server.log_tail()}"
    )


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process; None when gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), fields[19]


def process_tree(root: int) -> dict[int, str]:
    """Every live descendant of `root` (and root), mapped to its start time."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                parents[int(entry)], starts[int(entry)] = info
    tree = {root: starts.get(root, "")} if root in starts else {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        for pid in children:
            tree[pid] = starts[pid]
        frontier.extend(children)
    return tree


def _status_kb(pid: int, key: str, path: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(server: Server) -> dict[str, float]:
    """RSS (sum of VmRSS, shared pages counted per process) and PSS of the server's process tree."""
    tree = process_tree(server.proc.pid)
    server.tree.update(tree)
    rss = sum(_status_kb(pid, "VmRSS") for pid in tree)
    pss = sum(_status_kb(pid, "Pss", "smaps_rollup") for pid in tree)
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "processes": len(tree)}


def _alive(pid: int, start: str) -> bool:
    info = _stat(pid)
    return info is not None and info[1] == start


def _wait_gone(pids: dict[int, str], deadline_s: float, server: Server) -> dict[int, str]:
    deadline = time.perf_counter() + deadline_s
    left = {pid: start for pid, start in pids.items() if _alive(pid, start)}
    while left and time.perf_counter() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=0.05)  # also reaps our direct child
        left = {pid: start for pid, start in left.items() if _alive(pid, start)}
    return left


def session_members(sid: int) -> dict[int, str]:
    """Live processes in the session our launch created (catches children that were re-parented)."""
    members: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members[int(entry)] = fields[19]
    return members


def _signal_all(pids: dict[int, str], signum: int) -> None:
    for pid, start in pids.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def stop(server: Server, grace_s: float = 15.0) -> None:
    """SIGTERM the leader (graceful), then the rest of its tree, then SIGKILL what is left.

    Only processes that descend from our launch or live in the session it created are signalled,
    each checked by pid and start time."""
    if server.proc.poll() is None:
        server.tree.update(process_tree(server.proc.pid))
        server.tree.update(session_members(server.proc.pid))
        server.proc.send_signal(signal.SIGTERM)
    left = _wait_gone(server.tree, grace_s, server)
    if left:
        _signal_all(left, signal.SIGTERM)
        left = _wait_gone(left, 5.0, server)
    _signal_all(left, signal.SIGKILL)
    leader = _stat(server.proc.pid)
    if leader is None or leader[1] == server.leader_start:  # the session id is still ours
        _signal_all(session_members(server.proc.pid), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=10)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def wait_quiet(max_busy: float = 0.15, window_s: float = 1.0, deadline_s: float = 60.0) -> float:
    """Wait until the machine is mostly idle, so one server's teardown (Ray's many processes take
    seconds to exit) does not load the next server's measurement. Returns the last busy share; gives
    up at the deadline and says so in the log rather than waiting forever."""
    end = time.monotonic() + deadline_s
    busy_share = 1.0
    while time.monotonic() < end:
        b0, t0 = _cpu_times()
        # A measuring window, not a wait for an event: CPU use is only defined over an interval.
        time.sleep(window_s)
        b1, t1 = _cpu_times()
        busy_share = (b1 - b0) / max(1, t1 - t0)
        if busy_share <= max_busy:
            return busy_share
    return busy_share
