"""Issue 17's targets, each computed from one run's results and printed next to its goal.

Every row is {"name", "value", "goal", "met", "detail"}: ``value`` is None (and ``met`` None) when
the run lacks what the ratio needs, and ``detail`` then says what was missing.
"""

from __future__ import annotations

from typing import Any

from .config import CONCURRENCIES
from .floors import HTTP_FLOOR

# goal: (comparison, bound); ratios read "modelpod / reference"
AT_LEAST, AT_MOST, ABOVE = ">=", "<=", ">"
MEMORY_TOLERANCE = 1.10  # within 10 % of the baseline: not more than 1.10x its memory
COLD_MARGIN_S = 0.3


def _ok(server: dict[str, Any] | None) -> bool:
    return server is not None and server.get("status") == "ok"


def _point(server: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    if server is None or not _ok(server):
        return None
    return next((dict(p) for p in server.get("load", []) if p["concurrency"] == concurrency), None)


def _p50_us(point: dict[str, Any]) -> float:
    """Microseconds; results from before p50_us existed carry p50_ms with the same resolution."""
    return float(point["p50_us"]) if "p50_us" in point else float(point["p50_ms"]) * 1000


def _row(name: str, value: float | None, goal: tuple[str, float], detail: str) -> dict[str, Any]:
    op, bound = goal
    met = None
    if value is not None:
        met = value >= bound if op == AT_LEAST else value <= bound if op == AT_MOST else value > bound
    text = f"{op} +{bound:g} s" if name.endswith("(s)") else f"{op} {bound:g}"
    return {"name": name, "value": value, "goal": text, "met": met, "detail": detail}


def _missing(name: str, goal: tuple[str, float], why: str) -> dict[str, Any]:
    return _row(name, None, goal, why)


def _http_floor(workloads: dict[str, Any]) -> dict[str, Any]:
    name, goal = "A c=64 req/s / HTTP floor req/s (same core)", (AT_LEAST, 0.25)
    servers = workloads.get("A", {}).get("servers", {})
    own, floor = _point(servers.get("modelpod"), 64), _point(servers.get(HTTP_FLOOR), 64)
    if own is None or floor is None or not floor["ok_rps"]:
        return _missing(name, goal, "needs workload A with modelpod and the HTTP floor measured")
    return _row(name, own["ok_rps"] / floor["ok_rps"], goal,
                f"modelpod {own['ok_rps']:,.0f} req/s, floor {floor['ok_rps']:,.0f} req/s")


def _latency(workloads: dict[str, Any]) -> dict[str, Any]:
    name, goal = "A c=1 p50 / FastAPI c=1 p50", (AT_MOST, 0.5)
    servers = workloads.get("A", {}).get("servers", {})
    own, peer = _point(servers.get("modelpod"), 1), _point(servers.get("fastapi"), 1)
    if own is None or peer is None or not _p50_us(peer):
        return _missing(name, goal, "needs workload A with modelpod and the fastapi peer measured")
    return _row(name, _p50_us(own) / _p50_us(peer), goal,
                f"modelpod {_p50_us(own):,.0f} us, FastAPI {_p50_us(peer):,.0f} us")


def _batched(workloads: dict[str, Any]) -> dict[str, Any]:
    name, goal = "B c=64 req/s / in-process batch-32 rows/s", (AT_LEAST, 0.6)
    workload = workloads.get("B", {})
    own = _point(workload.get("servers", {}).get("modelpod"), 64)
    limit = workload.get("inprocess", {}).get("batch_32", {}).get("rows_per_s")
    if own is None or not limit:
        return _missing(name, goal, "needs workload B with modelpod measured")
    return _row(name, own["ok_rps"] / limit, goal,
                f"modelpod {own['ok_rps']:,.0f} req/s, in-process {limit:,.0f} rows/s")


def _cold(label: str, server: dict[str, Any] | None, floor: dict[str, Any] | None) -> dict[str, Any]:
    name, goal = f"cold start - framework floor, {label} (s)", (AT_MOST, COLD_MARGIN_S)
    cold = (server or {}).get("cold_start_s") if _ok(server) else None
    if cold is None or not floor or floor.get("status") != "ok":
        why = (floor or {}).get("error") or "not measured"
        return _missing(name, goal, f"needs the pod's cold start and its framework floor ({why})")
    return _row(name, cold - floor["cold_start_s"], goal,
                f"modelpod {cold:.2f} s next to the floor's {floor['cold_start_s']:.2f} s")


def _cold_starts(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    a, b = workloads.get("A", {}), workloads.get("B", {})
    small = a.get("small_pod")
    return [
        _cold("A sklearn pod", a.get("servers", {}).get("modelpod"), a.get("framework_floor")),
        _cold("B torch pod", b.get("servers", {}).get("modelpod"), b.get("framework_floor")),
        _cold("ONNX small pod (A as ONNX)", small, (small or {}).get("framework_floor")),
    ]


def _wires(perf: dict[str, Any], keys: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    runs = perf.get("workloads", {})
    for key in keys:
        for concurrency in CONCURRENCIES:
            for wire in ("binary", "grpc"):
                name = f"{key} c={concurrency} {'binary' if wire == 'binary' else 'gRPC'} / JSON infer/s"
                goal = (ABOVE, 1.0)
                run = runs.get(key)
                if "skipped" in perf or not isinstance(run, dict) or "error" in run:
                    why = perf.get("skipped") or (run or {}).get("error") or "perf_analyzer not run"
                    rows.append(_missing(name, goal, f"perf_analyzer: {why}"))
                    continue
                json_p: dict[str, Any] = next((p for p in run.get("json", []) if p["concurrency"] == concurrency), {})
                other: dict[str, Any] = next((p for p in run.get(wire, []) if p["concurrency"] == concurrency), {})
                failed = [p["error"] for p in (json_p, other) if "error" in p]
                if failed or "infer_per_s" not in json_p or "infer_per_s" not in other:
                    rows.append(_missing(name, goal, failed[0] if failed else "point not measured"))
                    continue
                rows.append(_row(name, other["infer_per_s"] / json_p["infer_per_s"], goal,
                                 f"JSON {json_p['infer_per_s']:,.0f}, {wire} {other['infer_per_s']:,.0f} infer/s"))
    return rows


def _memory(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key, workload in workloads.items():
        servers = workload.get("servers", {})
        own = servers.get("modelpod")
        base_name = next((n for n in servers if n.startswith("modelpod@")), None)
        base = servers.get(base_name) if base_name else None
        for kind in ("rss", "pss"):
            name, goal = f"{key} modelpod {kind.upper()} / baseline's", (AT_MOST, MEMORY_TOLERANCE)
            mine = (own or {}).get("memory", {}).get(f"{kind}_mb") if _ok(own) else None
            if mine is None:
                rows.append(_missing(name, goal, "modelpod not measured"))
                continue
            theirs = (base or {}).get("memory", {}).get(f"{kind}_mb") if _ok(base) else None
            if not theirs:
                why = "no --baseline REV" if base_name is None else f"{base_name} not measured"
                rows.append(_missing(name, goal, f"modelpod {mine:,.1f} MB; {why}"))
                continue
            rows.append(_row(name, mine / theirs, goal, f"modelpod {mine:,.1f} MB, {base_name} {theirs:,.1f} MB"))
    return rows


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    workloads = results.get("workloads", {})
    rows = [_http_floor(workloads), _latency(workloads), _batched(workloads), *_cold_starts(workloads)]
    rows += _wires(results.get("perf_analyzer") or {}, list(workloads))
    return rows + _memory(workloads)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: name, value, goal, met / NOT MET / n/a, and what the value is made of."""
    width = max((len(r["name"]) for r in rows), default=0)
    goal_width = max((len(r["goal"]) for r in rows), default=0)
    lines = []
    for r in rows:
        seconds = r["name"].endswith("(s)")
        value = "n/a" if r["value"] is None else f"{r['value']:+.2f}" if seconds else f"{r['value']:.3f}"
        verdict = "n/a" if r["met"] is None else "met" if r["met"] else "NOT MET"
        goal = f"(target {r['goal']})".ljust(goal_width + 9)
        lines.append(f"{r['name'].ljust(width)}  {value:>7}  {goal}  {verdict:<7}  {r['detail']}")
    return lines
