"""Vision benchmark: a detector pod at 640x640, JPEG in and boxes out over OIP at c=8, next to ONNX
Runtime's own throughput on pre-decoded tensors at the same batch size, in the same run; and the
cold start of a detector pod.

Usage: .venv/bin/python benchmarks/vision.py [--quick] [--duration S] [--concurrency N] [--width-mult N]

Targets (issue 15): end to end >= 80 % of ONNX Runtime's images/s on letterboxed float tensors at the
batch size the server ran; cold start (launch to the first answered image) <= 1 s. The model is the
network of examples/detector.py with 3x its channels (about YOLOv8n's compute), untrained, its
class scores biased low, exported at 640x640 with Ultralytics' metadata; one ONNX Runtime thread
everywhere; the server and every in-process measurement run on core 0, wrk on core 1. The images
are 1280x960 JPEGs (a photo's size: decoded, resized to 640x480, padded). Files and results
(`vision-results.json`) go under benchmarks/.work/vision/.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.config import REPO_DIR, SERVER_CPU, WORK_DIR
from bench.loadgen import run_wrk
from bench.procs import free_port, launch, post_json, stop, wait_first_prediction

OUT = WORK_DIR / "vision"
HOME = OUT / "home"
POD = "det640"
IMGSZ = 640
PHOTO = (1280, 960)


def log(message: str) -> None:
    print(f"[vision-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def example() -> Any:
    spec = importlib.util.spec_from_file_location("detector_example", REPO_DIR / "examples" / "detector.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(mult: int) -> Path:
    """The example detector's network with ``mult`` times its channels (3: about YOLOv8n's 8.7 GFLOPs
    at 640), seeded and untrained, its class scores biased low as a trained detector's background
    is (so NMS sees a handful of boxes, as on real photos), exported at 640x640."""
    path = OUT / f"det640-x{mult}.onnx"
    if not path.exists():
        import torch

        log(f"exporting the example's network x{mult} at {IMGSZ}x{IMGSZ}")
        mod = example()
        torch.manual_seed(0)
        net = mod.network([w * mult for w in mod.WIDTHS]).eval()
        with torch.no_grad():
            net.head.bias[4:] = -8.0
        mod.export(net, path, IMGSZ)
    return path


def photos(n: int) -> list[bytes]:
    from PIL import Image

    mod = example()
    rng = np.random.default_rng(7)
    files = []
    for _ in range(n):
        img, _ = mod.scene(rng, *PHOTO, count=4)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        files.append(buf.getvalue())
    return files


def modelpod(*args: str) -> None:
    subprocess.run([str(REPO_DIR / ".venv" / "bin" / "modelpod"), "--home", str(HOME), *args], check=True,
                   stdout=subprocess.DEVNULL)


def pinned(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with this process on the server's core (restored afterwards)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(SERVER_CPU)})
    try:
        return fn(*args)
    finally:
        os.sched_setaffinity(0, before)


def ort_floor(model: Path, files: list[bytes], batch: int, seconds: float) -> tuple[float, float]:
    """ONNX Runtime alone (one thread) on tensors decoded and letterboxed beforehand: images/s and
    CPU seconds per image."""
    import onnxruntime as ort

    from modelpod.vision.image import decode, letterbox, to_tensor

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    x = to_tensor([letterbox(decode(files[i % len(files)]), (IMGSZ, IMGSZ))[0] for i in range(batch)])
    session.run(None, {"images": x})
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {"images": x})
        done += batch
    return done / (time.perf_counter() - t0), (time.process_time() - c0) / done


def in_process(files: list[bytes], batch: int, seconds: float) -> tuple[float, float]:
    """The pod's own predict (decode, letterbox, ONNX Runtime, NMS, boxes back), no HTTP: images/s
    and CPU seconds per image."""
    import modelpod
    from modelpod.store import Store

    model = modelpod.load(POD, store=Store(HOME))
    arr = np.empty(batch, dtype=object)
    arr[:] = [files[i % len(files)] for i in range(batch)]
    model({"images": arr})
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        model({"images": arr})
        done += batch
    return done / (time.perf_counter() - t0), (time.process_time() - c0) / done


def body(files: list[bytes]) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(files[0]).decode()]}]}).encode()


def serve(port: int, tag: str) -> Any:
    cmd = [str(REPO_DIR / ".venv" / "bin" / "modelpod"), "--home", str(HOME), "serve", POD, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR / "src")}
    return launch(tag, cmd, env, REPO_DIR, OUT / "logs" / f"{tag}.log", SERVER_CPU)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (from /proc)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
    return text


def settled(port: int) -> str:
    """The metrics once the requests wrk left in flight are answered (the image count stops moving)."""
    text, deadline = scrape(port), time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = scrape(port)
        if metric(again, "modelpod_batch_rows_sum") == metric(text, "modelpod_batch_rows_sum"):
            return again
        text = again
    return text


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{POD}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s per point, 1 cold start")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 10, 3 with --quick)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--width-mult", type=int, default=3, help="channels x N of the example's network (3)")
    args = parser.parse_args(argv)
    seconds = args.duration or (3 if args.quick else 10)
    OUT.mkdir(parents=True, exist_ok=True)
    model = make_model(args.width_mult)
    files = photos(8)
    if HOME.exists():
        import shutil

        shutil.rmtree(HOME)
    modelpod("pack", str(model), "--name", POD, "--option", "threads=1")
    url = f"/v2/models/{POD}/infer"
    req = body(files)
    (OUT / "body.json").write_bytes(req)

    starts = []
    for i in range(1 if args.quick else 3):
        port = free_port()
        server = serve(port, f"cold-{i}")
        try:
            cold, _ = wait_first_prediction(server, f"http://127.0.0.1:{port}{url}", req, 120)
            starts.append(cold)
        finally:
            stop(server)
    cold_s = statistics.median(starts)
    log(f"cold start (launch to first answered image): {cold_s:.3f}s of {[round(s, 3) for s in starts]}")

    port = free_port()
    server = serve(port, "load")
    try:
        wait_first_prediction(server, f"http://127.0.0.1:{port}{url}", req, 120)
        post_json(f"http://127.0.0.1:{port}{url}", req, 30)
        images0, cpu0 = metric(scrape(port), "modelpod_batch_rows_sum"), cpu_seconds(server.proc.pid)
        load = run_wrk(f"http://127.0.0.1:{port}{url}", OUT / "body.json", args.concurrency, seconds,
                       OUT / "logs" / "wrk.log")
        text = settled(port)
        server_cpu = (cpu_seconds(server.proc.pid) - cpu0) / max(1.0, metric(text, "modelpod_batch_rows_sum") - images0)
    finally:
        stop(server)
    batches = metric(text, "modelpod_batch_rows_count")
    mean_batch = metric(text, "modelpod_batch_rows_sum") / batches if batches else 1.0
    batch = max(1, round(mean_batch))
    log(f"server at c={args.concurrency}: {load.ok_rps:.1f} images/s, p50 {load.p50_ms:.1f} ms, "
        f"mean batch {mean_batch:.2f} images, {load.non2xx} non-2xx")
    floor, floor_cpu = pinned(ort_floor, model, files, batch, seconds)
    floor_c = pinned(ort_floor, model, files, args.concurrency, seconds)[0] if batch != args.concurrency else floor
    inproc, inproc_cpu = pinned(in_process, files, batch, seconds)
    results = {
        "imgsz": IMGSZ, "photo": list(PHOTO), "concurrency": args.concurrency, "seconds": seconds,
        "width_mult": args.width_mult, "cold_start_s": cold_s, "cold_starts_s": starts,
        "server_images_per_s": load.ok_rps, "server_p50_ms": load.p50_ms, "server_p99_ms": load.p99_ms,
        "non2xx": load.non2xx, "mean_batch": mean_batch,
        "ort_images_per_s_at_server_batch": floor, f"ort_images_per_s_at_batch_{args.concurrency}": floor_c,
        "in_process_images_per_s": inproc,
        "ratio_server_vs_ort": load.ok_rps / floor if floor else 0.0,
        "ratio_in_process_vs_ort": inproc / floor if floor else 0.0,
        # CPU time per image (less moved by other work on a shared machine than images/s):
        "ort_cpu_ms_per_image": floor_cpu * 1e3, "in_process_cpu_ms_per_image": inproc_cpu * 1e3,
        "server_cpu_ms_per_image": server_cpu * 1e3,
        "cpu_ratio_server_vs_ort": floor_cpu / server_cpu if server_cpu else 0.0,
        "cpu_ratio_in_process_vs_ort": floor_cpu / inproc_cpu if inproc_cpu else 0.0,
    }
    (OUT / "vision-results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nvision benchmark ({'smoke' if args.quick else 'full'}; {IMGSZ}x{IMGSZ}, {PHOTO[0]}x{PHOTO[1]} JPEGs, "
          f"1 ORT thread, core {SERVER_CPU})")
    print(f"  ONNX Runtime on tensors, batch {batch}:      {floor:8.1f} images/s")
    if batch != args.concurrency:
        print(f"  ONNX Runtime on tensors, batch {args.concurrency}:      {floor_c:8.1f} images/s")
    print(f"  pod predict in-process, batch {batch}:       {inproc:8.1f} images/s   "
          f"ratio {results['ratio_in_process_vs_ort']:.2f}")
    print(f"  server JPEG in, boxes out, c={args.concurrency}:      {load.ok_rps:8.1f} images/s   "
          f"ratio {results['ratio_server_vs_ort']:.2f} (target >= 0.80)")
    print(f"  cold start of the detector pod:        {cold_s:8.3f} s            (target <= 1 s)")
    print(f"  CPU ms per image: ONNX Runtime {floor_cpu * 1e3:.1f}, in-process {inproc_cpu * 1e3:.1f} "
          f"(ratio {results['cpu_ratio_in_process_vs_ort']:.2f}), server {server_cpu * 1e3:.1f} "
          f"(ratio {results['cpu_ratio_server_vs_ort']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
