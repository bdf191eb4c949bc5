"""Drift: reference distributions kept in the pod, streaming histograms of live inputs, PSI.

At pack time the sample (``--sample``, or ``--reference FILE`` with more rows) gives each input
feature its reference distribution, written to the pod as ``reference.json``: a numeric feature
as ``BINS`` quantile bins (inner edges, and the share of reference rows in each bin), a text or
categorical one as its ``MAX_CATEGORIES`` most frequent values plus "other". A feature is a 1-D
input, or one column of a 2-D input ``x`` (named ``x[0]``, ``x[1]``…); wider tensors (images) have
none.

Serving, at most ``BATCHES_PER_S`` batches a second are handed to one background thread (a list
append; the rest are left out, so under load drift sees a sample of the traffic), which every
``INTERVAL_S`` joins each model version's batches and bins them in one go (``searchsorted`` +
``bincount``, or a broadcast compare for a 2-D input's columns). The live
distribution is the last two windows of ``window`` rows, so drift shows within a few thousand
rows and fades once inputs come back. Per feature the population stability index
``PSI = sum((live - ref) * ln(live / ref))`` (shares floored at 1e-4); the drift score of a model
version is its largest PSI. Rules of thumb: below 0.1 stable, 0.1-0.25 moderate, above 0.25 drift.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.model import Batch
from modelpod.pod import FileEntry, sha256_file

log = logging.getLogger("modelpod.observe")

REFERENCE_NAME = "reference.json"
BINS = 10
MAX_CATEGORIES = 20
MAX_COLUMNS = 256  # a 2-D input wider than this (an image row, an embedding) is not tracked
MIN_ROWS = 100  # live rows before a PSI is reported
WINDOW_ROWS = 5000
BATCHES_PER_S = 100.0  # batches taken for binning a second, at most
INTERVAL_S = 0.25  # how often the drift thread bins what it was handed
MODERATE, DRIFT = 0.1, 0.25
_FLOOR = 1e-4
_OTHER = "__other__"


def _columns(name: str, arr: np.ndarray[Any, Any]) -> Iterator[tuple[str, int | None, np.ndarray[Any, Any]]]:
    """(feature name, column index or None, the column) of each feature of one input."""
    if arr.ndim == 1:
        yield name, None, arr
    elif arr.ndim == 2 and arr.shape[1] <= MAX_COLUMNS:
        if arr.shape[1] == 1:
            yield name, 0, arr[:, 0]
            return
        for i in range(arr.shape[1]):
            yield f"{name}[{i}]", i, arr[:, i]


def _text(values: np.ndarray[Any, Any]) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.tolist()]


def build_reference(arrays: Mapping[str, np.ndarray[Any, Any]], bins: int = BINS) -> dict[str, Any] | None:
    """The reference distributions of a sample's features, or None when it has none to track."""
    features: list[dict[str, Any]] = []
    rows = 0
    for name, raw in arrays.items():
        arr = np.asarray(raw)
        if arr.ndim == 0 or arr.shape[0] < 2:
            continue
        rows = max(rows, int(arr.shape[0]))
        for feature, index, col in _columns(name, arr):
            base = {"feature": feature, "input": name, "index": index}
            if col.dtype.kind in "biuf":
                values = col.astype(np.float64)
                values = values[np.isfinite(values)]
                if values.size < 2:
                    continue
                edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
                counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
                features.append({**base, "kind": "numeric", "edges": [float(e) for e in edges],
                                 "reference": _shares(counts)})
            elif col.dtype.kind in "OUS":
                tally = Tally(_text(col))
                top = [v for v, _ in tally.most_common(MAX_CATEGORIES)]
                counts = np.array([tally[v] for v in top] + [sum(tally.values()) - sum(tally[v] for v in top)])
                features.append({**base, "kind": "categorical", "values": top, "reference": _shares(counts)})
    if not features:
        return None
    return {"format": 1, "rows": rows, "features": features}


def _shares(counts: np.ndarray[Any, Any]) -> list[float]:
    total = float(counts.sum())
    return [round(float(c) / total, 6) if total else 0.0 for c in counts]


def write_reference(directory: Path, arrays: Mapping[str, np.ndarray[Any, Any]]) -> FileEntry | None:
    """Write ``reference.json`` into a pod being packed; None when the sample has no features."""
    ref = build_reference(arrays)
    if ref is None:
        return None
    path = directory / REFERENCE_NAME
    path.write_text(json.dumps(ref, sort_keys=True), encoding="utf-8")
    return FileEntry(REFERENCE_NAME, sha256_file(path), path.stat().st_size, "config")


def read_reference(pod_dir: Path) -> dict[str, Any] | None:
    """A pod's reference distributions, or None (no file, or one this version cannot read)."""
    path = pod_dir / REFERENCE_NAME
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return ref if isinstance(ref, dict) and ref.get("format") == 1 and ref.get("features") else None


def psi(live: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> float:
    """Population stability index of two distributions (counts or shares), shares floored at 1e-4."""
    total = float(live.sum())
    if total <= 0:
        return 0.0
    a = np.maximum(live / total, _FLOOR)
    e = np.maximum(reference / max(float(reference.sum()), 1e-12), _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def status_of(score: float | None) -> str:
    if score is None:
        return "warming up"
    return "drift" if score >= DRIFT else "moderate" if score >= MODERATE else "ok"


class _Feature:
    __slots__ = ("current", "edges", "index", "input", "kind", "lookup", "name", "previous", "reference", "values")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.name = str(spec["feature"])
        self.input = str(spec["input"])
        self.index = spec.get("index")
        self.kind = str(spec["kind"])
        self.reference = np.asarray(spec["reference"], dtype=np.float64)
        self.edges = np.asarray(spec.get("edges") or [], dtype=np.float64)
        self.values = [str(v) for v in spec.get("values") or []]
        self.lookup = {v: i for i, v in enumerate(self.values)}
        self.current = np.zeros(self.reference.size, dtype=np.int64)
        self.previous = np.zeros(self.reference.size, dtype=np.int64)

    def observe(self, batch: Batch) -> None:
        arr = batch.get(self.input)
        if arr is None or arr.ndim == 0 or arr.ndim > 2:
            return
        if arr.ndim == 1:
            col = arr
        elif self.index is not None and arr.shape[1] > self.index:
            col = arr[:, self.index]
        else:
            return
        if self.kind == "numeric":
            if col.dtype.kind not in "biuf":
                return
            values = col.astype(np.float64, copy=False)
            if values.dtype.kind == "f":
                values = values[np.isfinite(values)]
            bins = np.searchsorted(self.edges, values, side="right")
        else:
            other = len(self.values)
            bins = np.fromiter((self.lookup.get(v, other) for v in _text(col)), dtype=np.int64, count=col.shape[0])
        self.current += np.bincount(bins, minlength=self.current.size)[: self.current.size]

    def live(self) -> np.ndarray[Any, Any]:
        return self.current + self.previous


class _Columns:
    """The numeric column features of one 2-D input, binned together: two numpy calls an edge rank a batch.

    Each feature's counts are a view of one row of ``current``/``previous`` (rotated in place)."""

    def __init__(self, name: str, features: list[_Feature]) -> None:
        self.input = name
        self.index = np.array([int(f.index or 0) for f in features], dtype=np.intp)
        # Columns side by side (the usual case: every column of x) are a slice, not a gather.
        first = int(self.index[0])
        self.take: slice | np.ndarray[Any, Any] = (
            slice(first, first + len(features))
            if np.array_equal(self.index, np.arange(first, first + len(features))) else self.index)
        width = max(f.edges.size for f in features)
        self.edges = np.full((len(features), width), np.inf)  # padded with +inf: never reached
        for row, f in enumerate(features):
            self.edges[row, : f.edges.size] = f.edges
        self.ranks = list(np.ascontiguousarray(self.edges.T))  # the k-th edge of every feature, contiguous
        self.slots = width + 2  # the bins, plus one for values that are not finite
        self.bin_type: type[np.integer[Any]] = np.uint8 if self.slots <= 256 else np.intp
        self.offsets = (np.arange(len(features)) * self.slots)[None, :]
        self.current = np.zeros((len(features), self.slots), dtype=np.int64)
        self.previous = np.zeros_like(self.current)
        for row, f in enumerate(features):
            f.current = self.current[row, : f.reference.size]
            f.previous = self.previous[row, : f.reference.size]

    def observe(self, batch: Batch) -> None:
        arr = batch.get(self.input)
        if arr is None or arr.ndim != 2 or arr.shape[1] <= int(self.index[-1]) or arr.dtype.kind not in "biuf":
            return
        x = arr[:, self.take].astype(np.float64, copy=False)
        # searchsorted(edges, x, "right") for every column at once: the number of its edges <= x,
        # one edge rank at a time (a compare and an add over the whole batch each; summing a 3-D
        # compare over its short last axis instead costs ~30x more, in numpy's reduction loop).
        bins = np.zeros(x.shape, dtype=self.bin_type)
        above = np.empty(x.shape, dtype=np.bool_)
        step = above.view(np.uint8) if self.bin_type is np.uint8 else above
        for edge in self.ranks:
            np.greater_equal(x, edge, out=above)
            bins += step
        bins[~np.isfinite(x)] = self.slots - 1
        counts = np.bincount(np.add(bins, self.offsets, dtype=np.intp).ravel(), minlength=self.current.size)
        self.current += counts.reshape(self.current.shape)


class DriftMonitor:
    """The live histograms of one model version against its pod's reference."""

    def __init__(self, reference: Mapping[str, Any], model: str, version: str, variant: str,
                 window: int = WINDOW_ROWS) -> None:
        self.model, self.version, self.variant = model, version, variant
        self.features = [_Feature(f) for f in reference.get("features") or ()]
        columns: dict[str, list[_Feature]] = {}
        self._singles: list[Any] = []
        for f in self.features:
            if f.kind == "numeric" and f.index is not None:
                columns.setdefault(f.input, []).append(f)
            else:
                self._singles.append(f)
        self._binners: list[Any] = [*(_Columns(n, fs) for n, fs in columns.items()), *self._singles]
        self.reference_rows = int(reference.get("rows") or 0)
        self.window = window
        self.rows = 0  # every row observed
        self._window_rows = 0
        self._previous_rows = 0
        self._lock = threading.Lock()

    def observe(self, batch: Batch) -> None:
        """Bin one batch (on the drift thread)."""
        first = next(iter(batch.values()), None)
        n = int(first.shape[0]) if first is not None and first.ndim else 0
        with self._lock:
            for binner in self._binners:
                binner.observe(batch)
            self.rows += n
            self._window_rows += n
            if self._window_rows >= self.window:  # in place: the column features hold views
                for binner in self._binners:
                    binner.previous[...] = binner.current
                    binner.current[...] = 0
                self._previous_rows, self._window_rows = self._window_rows, 0

    @property
    def window_rows(self) -> int:
        return self._window_rows + self._previous_rows

    def scores(self) -> list[tuple[str, float]]:
        """(feature, PSI) of each feature, once the window holds ``MIN_ROWS`` rows."""
        with self._lock:
            if self.window_rows < MIN_ROWS:
                return []
            return [(f.name, psi(f.live(), f.reference)) for f in self.features if f.live().sum() > 0]

    def score(self) -> float | None:
        scores = self.scores()
        return max(s for _, s in scores) if scores else None

    def table(self) -> dict[str, Any]:
        """What ``GET .../drift`` answers for this version: per feature, its bins, shares and PSI."""
        psis = dict(self.scores())
        features = []
        with self._lock:
            for f in self.features:
                live = f.live()
                total = float(live.sum())
                value = psis.get(f.name)
                row: dict[str, Any] = {
                    "feature": f.name, "kind": f.kind, "psi": None if value is None else round(value, 6),
                    "status": status_of(value), "rows": int(total),
                    "reference": [round(float(x), 6) for x in f.reference],
                    "live": [round(float(c) / total, 6) if total else 0.0 for c in live],
                }
                row["edges" if f.kind == "numeric" else "values"] = (
                    [float(e) for e in f.edges] if f.kind == "numeric" else f.values + [_OTHER])
                features.append(row)
        score = max(psis.values()) if psis else None
        return {"model": self.model, "version": self.version, "variant": self.variant, "rows": self.rows,
                "window_rows": self.window_rows, "reference_rows": self.reference_rows,
                "score": None if score is None else round(score, 6), "status": status_of(score),
                "features": features}


class DriftWorker:
    """The one thread that bins batches for every monitor.

    The event loop's side is an ``append`` to a list (no lock, no wake-up), at most ``rate``
    batches a second: the thread wakes every ``INTERVAL_S``, takes what is there and bins each
    monitor's batches together (one concatenation, one binning). Under load the histograms are a
    sample of the traffic (the first batches of each interval), and their cost stays a small,
    fixed share of a core. ``size`` caps the batches waiting; more are skipped and counted."""

    def __init__(self, size: int = 256, rate: float | None = None, interval_s: float = INTERVAL_S) -> None:
        self.size = size
        self.interval_s = interval_s
        self.rate = BATCHES_PER_S if rate is None else rate
        # A token bucket whose refill runs on the thread: the loop's side is ``taken < limit``,
        # the whole batches the bucket holds until the thread next wakes.
        self._depth = max(1.0, self.rate * interval_s)
        self._credit = self._depth
        self.limit = int(self._credit)
        self.taken = 0
        self._refilled = time.monotonic()
        self.sampled_out = 0  # batches left out by the rate (not counted as skipped)
        self.pending: list[tuple[DriftMonitor, Batch]] = []
        self.skipped: dict[tuple[str, str], int] = {}
        self._wake = threading.Event()
        self._markers: list[threading.Event] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def offer(self, monitor: DriftMonitor, batch: Batch) -> None:
        """Hand a batch over (on the event loop); never waits."""
        pending = self.pending
        if len(pending) >= self.size:
            key = (monitor.model, monitor.version)
            self.skipped[key] = self.skipped.get(key, 0) + 1
        elif self.taken < self.limit:
            self.taken += 1
            pending.append((monitor, batch))
            if self._thread is None:
                self._start()
        else:
            self.sampled_out += 1

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="modelpod-drift", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            markers, self._markers = self._markers, []
            items, self.pending = self.pending, []  # (an append racing this swap may be lost: a sample)
            now = time.monotonic()
            credit = self._credit - self.taken + self.rate * (now - self._refilled)
            self._credit = min(max(credit, 0.0), self._depth)
            self._refilled, self.taken, self.limit = now, 0, int(self._credit)
            self._bin(items)
            del items
            for marker in markers:
                marker.set()

    @staticmethod
    def _bin(items: list[tuple[DriftMonitor, Batch]]) -> None:
        groups: dict[int, tuple[DriftMonitor, list[Batch]]] = {}
        for monitor, batch in items:
            groups.setdefault(id(monitor), (monitor, []))[1].append(batch)
        for monitor, batches in groups.values():
            try:
                monitor.observe(join(batches))
            except Exception as exc:  # a strange batch must not stop drift for every model
                log.debug("drift: batches not binned", extra={"fields": {"model": monitor.model, "error": str(exc)}})

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every batch handed over so far is binned (tests, the benchmark); True if it was."""
        if self._thread is None:
            return True
        marker = threading.Event()
        self._markers.append(marker)
        self._wake.set()
        return marker.wait(timeout_s)

    def close(self) -> None:
        self._closing = True
        self._wake.set()


def join(batches: list[Batch]) -> Batch:
    """One batch of the rows of ``batches`` (those with the first one's inputs and shapes)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    same = [b for b in batches if b.keys() == first.keys()
            and all(b[k].ndim and b[k].shape[1:] == v.shape[1:] for k, v in first.items())]
    return {k: np.concatenate([b[k] for b in same]) for k in first}
