"""Interleaved A/B of the vision letterbox: an older ``vision/image.py`` (from a git revision) against
the working tree's, as CPU time in alternating rounds in one process (a shared machine moves both
alike). With ``--pod``: the pod's whole in-process predict too, each letterbox swapped in in turn.

Usage: .venv/bin/python benchmarks/tools/letterbox_ab.py --old REV [--pod] [--rounds N]
(``--pod`` needs the det640 pod that benchmarks/vision.py packs under benchmarks/.work/vision/home.)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
SIZES = [((960, 1280), "1280x960 to 640x480 (half)"), ((750, 1000), "1000x750 to 640x480"),
         ((1080, 1920), "1920x1080 to 640x360")]


def old_module(rev: str, into: Path) -> Any:
    src = subprocess.run(["git", "show", f"{rev}:src/modelpod/vision/image.py"], cwd=BENCH.parent,
                         check=True, capture_output=True, text=True).stdout
    path = into / "old_image.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_image", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_image"] = module
    spec.loader.exec_module(module)
    return module


def cpu_ms(fn: Callable[[], Any], n: int) -> float:
    t = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision of the A side")
    parser.add_argument("--pod", action="store_true", help="also the det640 pod's whole predict")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import vision as bench

    from modelpod.vision import image as new
    from modelpod.vision import task

    with tempfile.TemporaryDirectory() as tmp:
        old = old_module(args.old, Path(tmp))
    photo = new.decode(bench.photos(1)[0])
    big = np.ascontiguousarray(np.tile(photo, (2, 2, 1)))
    for (h, w), label in SIZES:
        img = np.ascontiguousarray(big[:h, :w])
        a = [cpu_ms(lambda: old.letterbox(img, (640, 640)), 20) for _ in range(args.rounds)]  # noqa: B023
        b = [cpu_ms(lambda: new.letterbox(img, (640, 640)), 20) for _ in range(args.rounds)]  # noqa: B023
        diff = np.abs(old.letterbox(img, (640, 640))[0].astype(int) - new.letterbox(img, (640, 640))[0]).max()
        print(f"letterbox {label}: CPU ms A {statistics.median(a):.2f}, B {statistics.median(b):.2f}; "
              f"largest pixel difference {diff}")
    if args.pod:
        import modelpod
        from modelpod.store import Store

        model = modelpod.load(bench.POD, store=Store(bench.HOME))
        arr = np.empty(3, dtype=object)
        arr[:] = bench.photos(3)
        model({"images": arr})
        got: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for side, fn in (("A", old.letterbox), ("B", new.letterbox)):
                task.letterbox = fn  # type: ignore[attr-defined]
                got[side].append(cpu_ms(lambda: model({"images": arr}), 4) / len(arr))
        print(f"pod predict, batch 3: CPU ms per image A {statistics.median(got['A']):.1f}, "
              f"B {statistics.median(got['B']):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
