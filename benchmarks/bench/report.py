"""The printed table, the ratios, and the results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import COLD_STARTS, CONCURRENCIES
from .floors import HTTP_FLOOR
from .peers import DISPLAY
from .perf import WIRES
from .targets import target_lines

WORKLOAD_TITLES = {
    "A": "A: scikit-learn LogisticRegression, 20 features, 1 row/request",
    "B": "B: PyTorch MLP 512-2048-2048-10, CPU, 1 thread, 1 row/request",
}


def _load_at(server: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    for point in server.get("load", []):
        if point["concurrency"] == concurrency:
            return dict(point)
    return None


def ok_rps(server: dict[str, Any], concurrency: int) -> float | None:
    point = _load_at(server, concurrency)
    return None if point is None else float(point["ok_rps"])


def _limit(workload: dict[str, Any]) -> float | None:
    batch = workload.get("inprocess", {}).get("batch_32")
    return None if batch is None else float(batch["rows_per_s"])


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _row(name: str, server: dict[str, Any], limit: float | None) -> list[str]:
    cells = [DISPLAY.get(name, name)]
    if server.get("status") != "ok":
        return cells + [f"{server.get('status', '?')}: {server.get('error', '')}"[:140]]
    errors = 0
    for concurrency in CONCURRENCIES:
        point = _load_at(server, concurrency)
        if point is None:
            cells += ["-", "-", "-"]
            continue
        errors += int(point["non2xx"]) + int(point["socket_errors"]) + int(point["timeouts"])
        cells += [_fmt(point["ok_rps"]), _fmt(point["p50_ms"], 1), _fmt(point["p99_ms"], 1)]
    c64 = ok_rps(server, CONCURRENCIES[-1])
    share = None if c64 is None or not limit else 100 * c64 / limit
    memory = server.get("memory", {})
    cells += [str(errors), _fmt(server.get("cold_start_s"), 2), _fmt(memory.get("rss_mb")), _fmt(share, 1)]
    return cells


HEADER = (
    ["server"]
    + [f"{h} c={c}" for c in CONCURRENCIES for h in ("req/s", "p50 ms", "p99 ms")]
    + [
        "errors",
        "cold s",
        "RSS MB",
        "c64 % of b32",
    ]
)


def _table_lines(rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines
    full = [r for r in rows if len(r) == len(HEADER)]
    widths = [max([len(HEADER[i]), *(len(r[i]) for r in full)]) for i in range(len(HEADER))]
    widths[0] = max([widths[0], *(len(r[0]) for r in rows)])
    out = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADER, widths, strict=True))
        )
    ]
    for row in rows:
        if len(row) < len(HEADER):  # a failed server: name then the reason
            out.append(row[0].ljust(widths[0]) + "  " + row[1])
        else:
            out.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    return out


def workload_block(key: str, workload: dict[str, Any], markdown: bool = False) -> list[str]:
    inproc = workload.get("inprocess", {})
    b1 = inproc.get("batch_1", {}).get("rows_per_s")
    b32 = inproc.get("batch_32", {}).get("rows_per_s")
    own_rss = inproc.get("rss_mb_loaded")
    title = (
        f"{WORKLOAD_TITLES.get(key, key)} -- in-process predict: batch 1 {_fmt(b1)} rows/s, "
        f"batch 32 {_fmt(b32)} rows/s, RSS with the model loaded {_fmt(own_rss)} MB"
    )
    rows = [_row(name, server, _limit(workload)) for name, server in workload.get("servers", {}).items()]
    return [("### " if markdown else "") + title, *_table_lines(rows, markdown)]


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """modelpod vs the best peer and vs FastAPI (per point), and B c=64 vs in-process batch 32."""
    out: dict[str, Any] = {}
    for key, workload in results.get("workloads", {}).items():
        servers = workload.get("servers", {})
        mine = servers.get("modelpod", {})
        if mine.get("status") != "ok":
            out[key] = {"note": "modelpod not measured"}
            continue
        entry: dict[str, Any] = {}
        for concurrency in CONCURRENCIES:
            own = ok_rps(mine, concurrency)
            peers: dict[str, float] = {}
            baseline: dict[str, Any] = {}
            for name, server in servers.items():
                rps = ok_rps(server, concurrency) if server.get("status") == "ok" else None
                if name.startswith("modelpod@") and rps and own is not None:
                    baseline = {"rev": name.split("@", 1)[1], "ratio": own / rps}
                elif name not in ("modelpod", HTTP_FLOOR) and rps:
                    peers[name] = rps
            point: dict[str, Any] = {}
            if baseline:
                point["vs_baseline"] = baseline
            floor = servers.get(HTTP_FLOOR, {})
            floor_rps = ok_rps(floor, concurrency) if floor.get("status") == "ok" else None
            if own is not None and floor_rps:
                point["vs_http_floor"] = {"ratio": own / floor_rps, "floor_rps": floor_rps}
            if own is not None and peers:
                best = max(peers, key=lambda n: peers[n])
                point["vs_best_peer"] = {"peer": best, "ratio": own / peers[best]}
            if own is not None and peers.get("fastapi"):
                point["vs_fastapi"] = own / peers["fastapi"]
            entry[f"c{concurrency}"] = point
        limit = _limit(workload)
        own64 = ok_rps(mine, CONCURRENCIES[-1])
        if key == "B" and limit and own64 is not None:
            entry["c64_vs_inprocess_batch32"] = own64 / limit
        own_rss = workload.get("inprocess", {}).get("rss_mb_loaded")
        server_rss = (mine.get("memory") or {}).get("rss_mb")
        if own_rss and server_rss:
            entry["rss_over_model_mb"] = server_rss - own_rss
        cold = mine.get("cold_start_s")
        if cold is not None:
            entry["cold_start_s"] = cold
        framework = workload.get("framework_floor", {})
        if cold is not None and framework.get("status") == "ok":
            entry["framework_floor_cold_start_s"] = framework["cold_start_s"]
            entry["cold_start_vs_framework_floor"] = cold / framework["cold_start_s"]
        small = workload.get("small_pod", {})
        if small.get("status") == "ok":
            entry["small_pod_cold_start_s"] = small["cold_start_s"]
        out[key] = entry
    return out


def ratio_lines(table: dict[str, Any]) -> list[str]:
    lines = ["Ratios (requests/s, modelpod / other):"]
    for key, entry in table.items():
        if "note" in entry:
            lines.append(f"  {key}: {entry['note']}")
            continue
        for concurrency in CONCURRENCIES:
            point = entry.get(f"c{concurrency}", {})
            best = point.get("vs_best_peer")
            best_text = f"{best['ratio']:.2f}x vs best peer ({DISPLAY[best['peer']]})" if best else "no peer"
            fast = point.get("vs_fastapi")
            fast_text = f"{fast:.2f}x vs FastAPI" if fast is not None else "FastAPI n/a"
            floor = point.get("vs_http_floor")
            floor_text = (f"; {floor['ratio']:.3f}x of the HTTP floor ({floor['floor_rps']:,.0f} req/s)"
                          if floor else "")
            base = point.get("vs_baseline")
            base_text = f"; {base['ratio']:.3f}x vs modelpod@{base['rev']}" if base else ""
            lines.append(f"  {key} c={concurrency}: {best_text}; {fast_text}{floor_text}{base_text}")
        if "c64_vs_inprocess_batch32" in entry:
            lines.append(
                f"  {key} c=64 vs in-process batch-32 rows/s: {entry['c64_vs_inprocess_batch32']:.2f}x"
            )
        if "rss_over_model_mb" in entry:
            lines.append(f"  {key} modelpod RSS over the model's own process: {entry['rss_over_model_mb']:+.0f} MB")
        if "cold_start_s" in entry:
            lines.append(f"  {key} modelpod cold start (median of {COLD_STARTS}): {entry['cold_start_s']:.2f} s")
        if "cold_start_vs_framework_floor" in entry:
            floor_s, ratio = entry["framework_floor_cold_start_s"], entry["cold_start_vs_framework_floor"]
            lines.append(f"  {key} cold start vs the framework floor (python -c: import, load, predict once; "
                         f"{floor_s:.2f} s): {ratio:.2f}x")
        if "small_pod_cold_start_s" in entry:
            lines.append(f"  {key} modelpod cold start of a small pod (the same model as ONNX, median of "
                         f"{COLD_STARTS}): {entry['small_pod_cold_start_s']:.2f} s")
    return lines


def render(results: dict[str, Any], markdown: bool = False) -> str:
    lines: list[str] = []
    for note in results.get("notes", []):
        lines.append(note)
    for key, workload in results.get("workloads", {}).items():
        lines += ["", *workload_block(key, workload, markdown)]
    bullet = "- " if markdown else "  "
    ratio = ratio_lines(results.get("ratios", {}))
    lines += ["", ratio[0], *(bullet + line.strip() for line in ratio[1:])]
    perf = results.get("perf_analyzer")
    if perf:
        lines += ["", "perf_analyzer against modelpod (a launch with gRPC on; JSON / binary over REST, gRPC):"]
        lines += [bullet + line for line in _perf_lines(perf)]
    if "targets" in results:
        block = target_lines(results["targets"])
        lines += ["", "Issue 17 targets (value, target, verdict, what it is made of):"]
        lines += ["```", *block, "```"] if markdown else [bullet + line for line in block]
    return "\n".join(lines)


def _perf_lines(perf: dict[str, Any]) -> list[str]:
    if "skipped" in perf:
        return [f"not run: {perf['skipped']}"]
    if not perf.get("workloads"):
        return ["not run: modelpod was not measured"]
    lines = []
    for key, run in perf["workloads"].items():
        if "error" in run:
            lines.append(f"{key}: failed: {run['error']}")
            continue
        for concurrency in CONCURRENCIES:
            cells = []
            for wire in WIRES:
                p = next((p for p in run.get(wire, []) if p["concurrency"] == concurrency), None)
                if p is None or "error" in p:
                    cells.append(f"{wire} failed" + (f" ({p['error'][:160]})" if p else ""))
                else:
                    cells.append(f"{wire} {p['infer_per_s']:,.0f} infer/s (p50 {p['p50_ms']:.2f} ms, "
                                 f"p99 {p['p99_ms']:.2f} ms)")
            lines.append(f"{key} c={concurrency}: " + "; ".join(cells))
    return lines


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False))
    path.with_suffix(".md").write_text(render(results, markdown=True) + "\n")
