"""modelpod side by side with its peers: LitServe, MLServer, BentoML, Ray Serve, bare FastAPI.

Usage: .venv/bin/python benchmarks/run.py [--quick] [--peers litserve,mlserver,...] [--workloads A,B]
                                          [--duration S] [--no-modelpod] [--no-perf]

One venv per peer under benchmarks/.work/venvs (installed once, then reused), both models made
from synthetic data, every server pinned to core 0 and wrk to core 1, concurrency 1/8/64.
Prints one table per workload plus ratios; writes benchmarks/.work/results.json (and .md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import floors, loadgen, modelpod, perf, procs, report, targets, venvs
from bench.config import (
    ALL_PEERS,
    ALL_WORKLOADS,
    COLD_STARTS,
    CONCURRENCIES,
    LOGS_DIR,
    PEER_ENVS,
    PERF_ENV,
    RESULTS_PATH,
    RUNTIME_DIR,
    SERVER_CPU,
    WORKLOADS_ENV,
    Durations,
)
from bench.peers import COMMON_VERSION_KEYS, VERSION_KEYS, LaunchSpec, peer_launch
from bench.workloads import Workload, check_prediction, make_models, measure_inprocess


@dataclass(frozen=True)
class Options:
    peers: tuple[str, ...]
    workloads: tuple[str, ...]
    durations: Durations
    with_modelpod: bool
    with_perf: bool
    quick: bool
    baseline: str | None = None


def _csv(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})"
        )
    return items


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s per point, short warm-up")
    parser.add_argument("--peers", default=",".join(ALL_PEERS), help="comma list of peers (default: all)")
    parser.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma list: A,B")
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per wrk point (default 10; 3 quick)"
    )
    parser.add_argument("--no-modelpod", action="store_true", help="benchmark the peers only")
    parser.add_argument("--no-perf", action="store_true", help="skip perf_analyzer")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also serve modelpod at git revision REV (row modelpod@REV): an A/B of two commits")
    args = parser.parse_args(argv)
    try:
        peers = _csv(args.peers, ALL_PEERS, "peer")
        workloads = _csv(args.workloads.upper(), ALL_WORKLOADS, "workload")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    load_s = args.duration or (3 if args.quick else 10)
    durations = Durations(
        load_s=load_s, warmup_s=1 if args.quick else 3, inprocess_s=1.0 if args.quick else 3.0
    )
    return Options(peers, workloads, durations, not args.no_modelpod, not args.no_perf, args.quick, args.baseline)


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def bench_server(
    label: str,
    make_spec: Callable[[int], LaunchSpec],
    workload: Workload,
    opts: Options,
) -> dict[str, Any]:
    """Launch one server, time its cold start, check its answer, drive it at each concurrency."""
    port = procs.free_port()
    spec = make_spec(port)
    log_path = LOGS_DIR / f"server-{label}-{workload.key}.log"
    wrk_log = LOGS_DIR / f"wrk-{label}-{workload.key}.log"
    wrk_log.write_text("")
    url = f"http://127.0.0.1:{port}{workload.route}"
    body = workload.body_path.read_bytes()
    result: dict[str, Any] = {"command": spec.cmd, "log": str(log_path)}
    # Cold start is one number from a noisy launch: take the median of a few launches, all but
    # the last stopped after their first answer; the last one goes on to the load runs.
    try:
        colds = [cold for cold, _ in cold_starts(label, spec, url, body, log_path, opts, COLD_STARTS - 1)]
    except procs.ServerError:
        colds = []  # the launch below reports the failure
    server = launch_quiet(label, spec, log_path)
    stage = "start"
    try:
        cold, answer = procs.wait_first_prediction(server, url, body, opts.durations.cold_start_deadline_s,
                                                   spec.headers)
        stage = "load"
        colds.append(cold)
        result.update(cold_start_s=statistics.median(colds), cold_start_runs_s=colds,
                      check=check_prediction(workload, answer), sample_response=answer)
        log(f"{label} {workload.key}: first prediction after {', '.join(f'{c:.2f}' for c in colds)} s "
            f"({result['check']})")
        loadgen.run_wrk(url, workload.body_path, 8, opts.durations.warmup_s, wrk_log, spec.headers)
        points = []
        for concurrency in CONCURRENCIES:
            point = loadgen.run_wrk(url, workload.body_path, concurrency, opts.durations.load_s, wrk_log,
                                    spec.headers)
            log(
                f"{label} {workload.key} c={concurrency}: {point.ok_rps:,.0f} req/s, "
                f"p50 {point.p50_ms:.1f} ms, p99 {point.p99_ms:.1f} ms, non-2xx {point.non2xx}"
            )
            points.append(point.to_json())
        result["load"] = points
        result["memory"] = procs.tree_memory(server)
        result["loadavg_1m_after"] = os.getloadavg()[0]  # others' work on the box skews everything
        result["status"] = "ok"
    except (procs.ServerError, loadgen.LoadError, OSError) as exc:
        summary = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        result.update(status="failed", stage=stage, error=summary)
        result["error_detail"] = str(exc)
        log(f"{label} {workload.key}: FAILED {summary} (log: {log_path})")
    finally:
        procs.stop(server)
    return result


def launch_quiet(label: str, spec: LaunchSpec, log_path: Path) -> procs.Server:
    """Launch a server on the server core once the machine is idle."""
    busy = procs.wait_quiet()
    if busy > 0.15:
        log(f"{label}: machine still {busy:.0%} busy after waiting; numbers may be low")
    return procs.launch(label, spec.cmd, spec.env, spec.cwd, log_path, SERVER_CPU)


def cold_starts(label: str, spec: LaunchSpec, url: str, body: bytes, log_path: Path, opts: Options,
                count: int) -> list[tuple[float, Any]]:
    """Launch, wait for the first answer, stop, ``count`` times: (seconds, answer) per launch."""
    runs = []
    for _ in range(count):
        server = launch_quiet(label, spec, log_path)
        try:
            runs.append(procs.wait_first_prediction(server, url, body, opts.durations.cold_start_deadline_s,
                                                    spec.headers))
        finally:
            procs.stop(server)
    return runs


def prepare_workloads(opts: Options) -> tuple[dict[str, Workload], dict[str, Any]]:
    log("workloads venv + models")
    python = venvs.ensure(WORKLOADS_ENV, opts.durations.install_deadline_s)
    made = make_models(python)
    chosen = {key: made[key] for key in opts.workloads}
    inproc = {}
    for key, workload in chosen.items():
        inproc[key] = measure_inprocess(python, workload, opts.durations.inprocess_s)
        log(
            f"in-process {key}: batch 1 {inproc[key]['batch_1']['rows_per_s']:,.0f} rows/s, "
            f"batch 32 {inproc[key]['batch_32']['rows_per_s']:,.0f} rows/s"
        )
    return chosen, inproc


def install_peers(opts: Options) -> tuple[list[str], dict[str, str], dict[str, dict[str, str]]]:
    ready, failed, versions = [], {}, {}
    for peer in opts.peers:
        log(f"venv {peer}")
        try:
            venvs.ensure(PEER_ENVS[peer], opts.durations.install_deadline_s)
        except venvs.InstallError as exc:
            failed[peer] = f"install failed: {exc}"
            log(f"{peer}: {failed[peer]}")
            continue
        installed = venvs.pip_freeze(PEER_ENVS[peer])
        versions[peer] = {k: installed.get(k, "?") for k in (*VERSION_KEYS[peer], *COMMON_VERSION_KEYS)}
        ready.append(peer)
    return ready, failed, versions


def prepare_modelpod(opts: Options, workloads: dict[str, Workload]) -> tuple[dict[str, str], str | None]:
    """Pack each workload; returns per-workload failure reasons and the modelpod version."""
    if not opts.with_modelpod:
        return {}, None
    try:
        version = modelpod.check_available()
        modelpod.reset_home()
    except modelpod.ModelpodUnavailable as exc:
        return {key: str(exc) for key in workloads}, None
    reasons: dict[str, str] = {}
    for key, workload in workloads.items():
        try:
            packed = modelpod.pack(workload)
            log(f"modelpod pack {key}: {packed}")
        except modelpod.ModelpodUnavailable as exc:
            reasons[key] = str(exc)
    return reasons, version


def prepare_perf(opts: Options) -> str | None:
    """None when perf_analyzer can run, else why not."""
    if not opts.with_perf:
        return "--no-perf"
    try:
        venvs.ensure(PERF_ENV, opts.durations.install_deadline_s)
        perf.check_runs()
    except (venvs.InstallError, perf.PerfUnavailable) as exc:
        return str(exc)
    return None


# A bound on perf_analyzer's time per point: in its synchronous mode, windows of 20,000 requests at
# c=64 took 2.5 s, then 11 s, then over 45 s here; asynchronous it keeps up, and the cap stays.
PERF_MAX_WINDOW = 5000


def bench_wires(workload: Workload, opts: Options, wrk_points: list[dict[str, Any]]) -> dict[str, Any]:
    """perf_analyzer at each concurrency in each wire format (JSON and binary tensors over REST,
    gRPC), interleaved per concurrency, against one modelpod launched with gRPC on its own port.
    Windows: as many requests as wrk answered in a quarter of a point at that concurrency, at least
    500 and at most PERF_MAX_WINDOW."""
    port, grpc_port = procs.free_port(), procs.free_port()
    spec = modelpod.serve_grpc_launch(workload, grpc_port, port)
    log_path = LOGS_DIR / f"server-modelpod-grpc-{workload.key}.log"
    url = f"http://127.0.0.1:{port}{workload.route}"
    rates = {p["concurrency"]: p["ok_rps"] for p in wrk_points}
    points: dict[str, list[dict[str, Any]]] = {wire: [] for wire in perf.WIRES}
    server = launch_quiet("modelpod-grpc", spec, log_path)
    try:
        procs.wait_first_prediction(server, url, workload.body_path.read_bytes(),
                                    opts.durations.cold_start_deadline_s, spec.headers)
        warmup_log = LOGS_DIR / f"wrk-modelpod-grpc-{workload.key}.log"
        loadgen.run_wrk(url, workload.body_path, 8, opts.durations.warmup_s, warmup_log, spec.headers)
        for concurrency in CONCURRENCIES:
            window = min(PERF_MAX_WINDOW, max(500, int(rates.get(concurrency, 0) * opts.durations.load_s / 4)))
            for wire in perf.WIRES:
                try:
                    point = perf.run_point(port, workload.model_name, workload.features, concurrency, window,
                                           RUNTIME_DIR, LOGS_DIR / f"perf-{workload.key}.log", spec.headers,
                                           wire=wire, grpc_port=grpc_port)
                    log(f"perf_analyzer {workload.key} {wire} c={concurrency}: {point['infer_per_s']:,.0f} infer/s")
                except perf.PerfUnavailable as exc:  # one point lost; the others still count
                    point = {"wire": wire, "concurrency": concurrency, "error": str(exc)}
                    log(f"perf_analyzer {workload.key} {wire} c={concurrency}: {exc}")
                points[wire].append(point)
    except (procs.ServerError, loadgen.LoadError, OSError) as exc:
        return {"error": f"modelpod with gRPC: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"}
    finally:
        procs.stop(server)
    return {"command": spec.cmd, **points}


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def preflight() -> None:
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"run.py needs `{tool}` on PATH")


def prepare_baseline(opts: Options, workloads: dict[str, Workload]) -> tuple[Any, dict[str, str]]:
    """Unpack ``--baseline REV``'s sources and pack every workload with them (their own store)."""
    if opts.baseline is None or not opts.with_modelpod:
        return None, {}
    reasons: dict[str, str] = {}
    try:
        src = modelpod.baseline_sources(opts.baseline)
    except modelpod.ModelpodUnavailable as exc:
        return None, {key: str(exc) for key in workloads}
    modelpod.set_baseline(src)
    try:
        modelpod.reset_home()
        for key, workload in workloads.items():
            try:
                log(f"modelpod@{opts.baseline} pack {key}: {modelpod.pack(workload)}")
            except modelpod.ModelpodUnavailable as exc:
                reasons[key] = str(exc)
    finally:
        modelpod.set_baseline(None)
    return src, reasons


def bench_baseline(workload: Workload, opts: Options, src: Any, reason: str | None) -> dict[str, Any]:
    if reason is not None:
        return {"status": "not available", "error": reason}
    modelpod.set_baseline(src)
    try:
        return bench_server(f"modelpod@{opts.baseline}", functools.partial(modelpod.serve_launch, workload),
                            workload, opts)
    finally:
        modelpod.set_baseline(None)


def bench_peers(workload: Workload, opts: Options, failed: dict[str, str]) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for peer in opts.peers:
        if peer in failed:
            servers[peer] = {"status": "not installed", "error": failed[peer]}
            continue
        servers[peer] = bench_server(peer, functools.partial(peer_launch, peer, workload), workload, opts)
    return servers


def bench_modelpod(workload: Workload, opts: Options, pack_error: str | None) -> tuple[dict[str, Any], str | None]:
    """modelpod's entry and, when it could not be used, the note saying why."""
    if pack_error is not None:
        return {"status": "not available", "error": pack_error}, f"modelpod: not available ({pack_error})"
    entry = bench_server("modelpod", functools.partial(modelpod.serve_launch, workload), workload, opts)
    if entry.get("stage") == "start":  # `modelpod serve` never answered
        entry["status"] = "not available"
        return entry, f"modelpod: not available ({entry['error']})"
    return entry, None


SMALL_POD = "logreg-onnx"


def bench_small_pod(workload: Workload, opts: Options) -> dict[str, Any]:
    """Cold start of a small pod: workload A's model as ONNX, served by modelpod (median of launches)."""
    if not workload.onnx_file.exists():
        return {"status": "not available", "error": "no model.onnx"}
    try:
        packed = modelpod.pack_file(workload.onnx_file, SMALL_POD, [])
    except modelpod.ModelpodUnavailable as exc:
        return {"status": "not available", "error": str(exc)}
    port = procs.free_port()
    spec = modelpod.serve_named(SMALL_POD, port)
    url = f"http://127.0.0.1:{port}/v2/models/{SMALL_POD}/infer"
    log_path = LOGS_DIR / f"server-modelpod-small-{workload.key}.log"
    try:
        runs = cold_starts("modelpod-small", spec, url, workload.onnx_body_path.read_bytes(), log_path, opts,
                           COLD_STARTS)
    except procs.ServerError as exc:
        return {"status": "failed", "error": str(exc).splitlines()[0], "pack": packed}
    colds = [cold for cold, _ in runs]
    labels = [o for o in runs[-1][1].get("outputs", []) if o.get("name") == "label"]
    check = check_prediction(workload, {"outputs": labels})
    log(f"modelpod small pod ({SMALL_POD}): first prediction after {', '.join(f'{c:.2f}' for c in colds)} s "
        f"({check})")
    return {"status": "ok", "pod": SMALL_POD, "pack": packed, "cold_start_s": statistics.median(colds),
            "cold_start_runs_s": colds, "check": check}


def floor_text(floor: dict[str, Any]) -> str:
    if floor.get("status") != "ok":
        return f"{floor.get('status')}: {floor.get('error')}"
    runs = ", ".join(f"{c:.2f}" for c in floor["cold_start_runs_s"])
    return f"{runs} s, median {floor['cold_start_s']:.2f} s ({floor['check']})"


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    preflight()
    for folder in (LOGS_DIR, RUNTIME_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    workloads, inproc = prepare_workloads(opts)
    _ready, failed, versions = install_peers(opts)
    modelpod_reasons, modelpod_version = prepare_modelpod(opts, workloads)
    baseline_src, baseline_reasons = prepare_baseline(opts, workloads)
    perf_reason = prepare_perf(opts) if opts.with_modelpod else "--no-modelpod"
    perf_points: dict[str, Any] = {}
    notes: list[str] = []
    measured: dict[str, Any] = {}
    for key, workload in workloads.items():
        servers = bench_peers(workload, opts, failed)
        if opts.with_modelpod:
            servers["modelpod"], note = bench_modelpod(workload, opts, modelpod_reasons.get(key))
            if note is not None and note not in notes:
                log(note)
                notes.append(note)
            if not perf_reason and servers["modelpod"].get("status") == "ok":
                perf_points[key] = bench_wires(workload, opts, servers["modelpod"]["load"])
            if baseline_src is not None or baseline_reasons:
                servers[f"modelpod@{opts.baseline}"] = bench_baseline(workload, opts, baseline_src,
                                                                      baseline_reasons.get(key))
        # The floors: the same wrk runs against bare uvloop+httptools, and the framework's own cold start.
        servers[floors.HTTP_FLOOR] = bench_server(
            floors.HTTP_FLOOR, functools.partial(floors.http_floor_launch, workload), workload, opts)
        framework_floor = floors.framework_cold_start(workload)
        log(f"framework floor {key}: {floor_text(framework_floor)}")
        measured[key] = {"inprocess": inproc[key], "servers": servers, "framework_floor": framework_floor}
        if opts.with_modelpod and key == "A" and key not in modelpod_reasons:
            measured[key]["small_pod"] = bench_small_pod(workload, opts)
            measured[key]["small_pod"]["framework_floor"] = onnx_floor = floors.framework_cold_start(
                workload, floors.ONNX_FLOOR)
            log(f"framework floor {key} as ONNX: {floor_text(onnx_floor)}")
    if perf_reason:
        notes.append(f"perf_analyzer: not run ({perf_reason})")
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "options": {
            "quick": opts.quick,
            "duration_s": opts.durations.load_s,
            "concurrency": list(CONCURRENCIES),
            "peers": list(opts.peers),
            "workloads": list(opts.workloads),
        },
        "versions": {**versions, "modelpod": modelpod_version},
        "notes": notes,
        "workloads": measured,
        "perf_analyzer": {"skipped": perf_reason} if perf_reason else {"workloads": perf_points},
    }
    results["ratios"] = report.ratios(results)
    results["targets"] = targets.targets(results)
    print()
    print(report.render(results))
    report.write(results, RESULTS_PATH)
    print(f"\nresults: {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
