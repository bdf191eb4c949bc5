"""Payload logging: sampled request/response pairs to a file (JSON Lines) or a URL (CloudEvents).

Configured by ``payload_log:`` in the serve config file, globally and per model (the model's keys
over the global ones; ``payload_log: off`` turns a model's off)::

    payload_log: {sample: 0.05, redact: [ssn, email], sink: /var/log/modelpod/payloads.jsonl}
    models:
      fraud: {payload_log: {sink: "http://logger.default/", sample: 1}}

A request is chosen with probability ``sample`` (drawn before anything is built for it) and
appended to its sink's bounded buffer; a background thread per sink wakes every ``FLUSH_S`` (or
when the buffer is half full), encodes what is there and writes it as one batch. A full buffer
drops the record (never waits), a failed write drops it too: both are counted in
``modelpod_payload_log_dropped_total``. So a sink that is down, slow or full never slows or fails
inference.

A file sink writes one JSON object per line and rotates at ``max_bytes`` (``path.1`` … ``path.N``
for ``backups: N``), so it never holds more than ``max_bytes * (backups + 1)``. A URL sink posts
two CloudEvents per pair in binary mode, as KServe's inference logger does (so its sinks accept
them): ``ce-type`` ``org.kubeflow.serving.inference.request`` then ``...response``, the same
``ce-id``, and the extensions ``inferenceservicename``, ``namespace``, ``component``, ``endpoint``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from modelpod.errors import UsageError
from modelpod.model import Batch
from modelpod.observe.context import TRACE
from modelpod.serving.metrics import Counter

if TYPE_CHECKING:  # imported by the HTTP sink when it first connects: a server without one never needs it
    import http.client

log = logging.getLogger("modelpod.observe")

CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"
REDACTED = "[REDACTED]"
FLUSH_S = 0.5  # how often a sink's thread looks for records (sooner when its buffer is half full)
KEYS = ("sink", "sample", "redact", "max_bytes", "backups", "queue", "timeout_s", "namespace", "source")


@dataclass(frozen=True)
class PayloadLogSpec:
    sink: str
    sample: float = 0.05
    redact: tuple[str, ...] = ()
    max_bytes: int = 64 * 1024 * 1024  # a file sink rotates at this size
    backups: int = 3  # rotated files kept
    queue: int = 1000  # records waiting for the sink; more are dropped
    timeout_s: float = 2.0  # a URL sink's connect and read timeout
    namespace: str = ""  # the CloudEvents ``namespace`` extension
    source: str = ""  # the CloudEvents ``source`` (default http://HOSTNAME/v2/models/NAME)

    @property
    def is_url(self) -> bool:
        return self.sink.startswith(("http://", "https://"))


def parse_payload_log(value: Any, where: str, base: PayloadLogSpec | None = None) -> PayloadLogSpec | None:
    """A ``payload_log:`` value as a spec (over ``base``, the global one); None when it turns logging off."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, str):
        value = {"sink": value}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: payload_log must be a mapping like {{sink: FILE|URL, sample: 0.05}}")
    unknown = [k for k in value if k not in KEYS]
    if unknown:
        raise UsageError(f"{where}: payload_log: unknown key(s) {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(KEYS)}")
    merged: dict[str, Any] = {} if base is None else {k: getattr(base, k) for k in KEYS}
    merged.update(value)
    sink = merged.get("sink")
    if not isinstance(sink, str) or not sink.strip():
        raise UsageError(f"{where}: payload_log needs a sink: a file path or an http(s):// URL")
    sample = merged.get("sample", 0.05)
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 <= sample <= 1:
        raise UsageError(f"{where}: payload_log.sample must be a number from 0 to 1, got {sample!r}")
    redact = merged.get("redact") or ()
    if isinstance(redact, str):
        redact = [redact]
    if not isinstance(redact, (list, tuple)) or not all(isinstance(r, str) and r for r in redact):
        raise UsageError(f"{where}: payload_log.redact must be a list of field names")
    ints = {}
    for key in ("max_bytes", "backups", "queue"):
        v = merged.get(key, getattr(PayloadLogSpec, key))
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "backups" else 1):
            raise UsageError(f"{where}: payload_log.{key} must be a positive integer, got {v!r}")
        ints[key] = v
    timeout = merged.get("timeout_s", 2.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise UsageError(f"{where}: payload_log.timeout_s must be a positive number, got {timeout!r}")
    spec = PayloadLogSpec(sink=sink.strip(), sample=float(sample), redact=tuple(r.lower() for r in redact),
                          timeout_s=float(timeout), namespace=str(merged.get("namespace") or ""),
                          source=str(merged.get("source") or ""), **ints)
    if spec.sink.startswith("file://"):
        spec = replace(spec, sink=spec.sink[len("file://"):])
    return spec


def redact(doc: Any, names: frozenset[str]) -> Any:
    """``doc`` with the value of every key in ``names`` (any depth, any case) and the data of every
    tensor named in ``names`` replaced by ``[REDACTED]``."""
    if not names:
        return doc
    if isinstance(doc, dict):
        if isinstance(doc.get("name"), str) and doc["name"].lower() in names and "data" in doc:
            data = doc["data"]
            return {**doc, "data": [REDACTED] * len(data) if isinstance(data, list) else REDACTED}
        return {k: REDACTED if isinstance(k, str) and k.lower() in names else redact(v, names)
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [redact(v, names) for v in doc]
    return doc


# What the engine hands over: (time, model, version, variant, route, id, trace, inputs, outputs); trace
# is the request's (trace id, span id, flags) or None, formatted on the sink's thread, not the request's.
Record = tuple[float, str, str, str, str, "str | None", "tuple[str, str, str] | None", Batch, Batch]


class PayloadSink:
    """One sink's bounded buffer and the thread that drains it.

    The request's side is a ``deque.append`` (no lock, no wake-up): the thread looks every
    ``FLUSH_S``, or at once when the buffer is half full, and writes everything there as one batch
    (a file sink in one ``write`` per rotation). A record counts against ``queue`` until it is
    written or dropped."""

    def __init__(self, spec: PayloadLogSpec, written: Counter, dropped: Counter) -> None:
        self.spec = spec
        self.records: deque[Record] = deque()
        self._wake = threading.Event()
        self._half = max(1, spec.queue // 2)
        self._closing = False
        self._written = written
        self._dropped = dropped
        self._names = frozenset(spec.redact)
        self._file: Any = None
        self._size = 0
        self._conn: http.client.HTTPConnection | None = None
        self._host = socket.gethostname()
        self._second, self._prefix = -1, ""  # _stamp's last whole second, formatted
        # Imported here, once: an import statement in _docs costs two failed attribute look-ups a record.
        from modelpod.protocols.codec import tensor_to_json

        self._to_json = tensor_to_json
        self._thread = threading.Thread(target=self._drain, name="modelpod-payload-log", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> bool:
        """Buffer one record (on the event loop); False when the buffer is full."""
        records = self.records
        if len(records) >= self.spec.queue:
            return False
        records.append(record)
        if len(records) == self._half:
            self._wake.set()
        return True

    def _drain(self) -> None:
        while True:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            closing = self._closing
            n = len(self.records)
            if n:
                self._write_batch(n)
            if closing:
                break
        self._reset()

    def _write_batch(self, n: int) -> None:
        """Write the oldest ``n`` records, then take them off the buffer."""
        records = self.records
        batch = [records[i] for i in range(n)]
        popped = 0
        try:
            if self.spec.is_url:
                for record in batch:  # a CloudEvent pair per record, as KServe's sinks take them
                    try:
                        self._post(record)
                    except Exception as exc:
                        self._failed([record], exc)
                    else:
                        self._count(self._written, [record])
                    records.popleft()
                    popped += 1
                return
            lines: list[bytes] = []
            kept: list[Record] = []
            for record in batch:
                try:
                    lines.append(self._line(record))
                except Exception as exc:
                    self._failed([record], exc)
                else:
                    kept.append(record)
            done, error = self._append(lines)
            if error is not None:
                self._failed(kept[done:], error)
            self._count(self._written, kept[:done])
        finally:
            for _ in range(n - popped):  # only this thread takes records off (appends go on the right)
                records.popleft()

    def _failed(self, lost: list[Record], exc: Exception) -> None:
        """A sink failure loses these records, never a request."""
        if lost:
            self._count(self._dropped, lost, "sink_error")
            log.debug("payload log write failed", extra={"fields": {"sink": self.spec.sink, "error": str(exc)}})
            self._reset()

    @staticmethod
    def _count(counter: Counter, records: list[Record], *reason: str) -> None:
        tally: dict[tuple[str, str], int] = {}
        for r in records:
            tally[r[1], r[2]] = tally.get((r[1], r[2]), 0) + 1
        for (model, version), k in tally.items():
            counter.labels(model, version, *reason).inc(k)

    def _reset(self) -> None:
        for closing in (self._file, self._conn):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()
        self._file = self._conn = None

    def _docs(self, record: Record) -> tuple[str, dict[str, Any], dict[str, Any]]:
        tensor_to_json = self._to_json
        _, model, version, _, _, rid, _, inputs, outputs = record
        rid = rid or uuid4_hex()
        request = {"id": rid, "inputs": [tensor_to_json(n, a) for n, a in inputs.items()]}
        response: dict[str, Any] = {"model_name": model, "id": rid,
                                    "outputs": [tensor_to_json(n, a) for n, a in outputs.items()]}
        if version:
            response["model_version"] = version
        if self._names:
            return rid, redact(request, self._names), redact(response, self._names)
        return rid, request, response

    def _stamp(self, when: float) -> str:
        """``when`` as RFC 3339 UTC to the microsecond, as ``datetime.fromtimestamp(when, utc).isoformat()``
        writes it (rounded half to even), with the date and time of day made once a second."""
        fraction, whole = math.modf(when)
        us = round(fraction * 1e6)
        if us >= 1_000_000:
            us -= 1_000_000
            whole += 1.0
        elif us < 0:
            us += 1_000_000
            whole -= 1.0
        second = int(whole)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{us:06d}Z"

    def _line(self, record: Record) -> bytes:
        """One JSON Lines record: the pair, its ids and labels (empty ones left out)."""
        when, model, version, variant, route, _, trace, _, _ = record
        rid, request, response = self._docs(record)
        doc: dict[str, Any] = {"time": self._stamp(when), "id": rid}
        if model:
            doc["model"] = model
        if version:
            doc["version"] = version
        if variant:
            doc["variant"] = variant
        if route:
            doc["route"] = route
        if trace is not None and trace[0]:
            doc["trace_id"] = trace[0]
        doc["request"], doc["response"] = request, response
        return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)

    # -- a file, rotated ----------------------------------------------------------------------------
    def _append(self, lines: list[bytes]) -> tuple[int, Exception | None]:
        """Append ``lines``, rotating at ``max_bytes``, one write per file: how many were written
        (and the error that stopped the rest)."""
        path = Path(self.spec.sink)
        done = 0
        try:
            while done < len(lines):
                if self._file is None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # Unbuffered: a failed write is that batch's, and nothing is left in a buffer
                    # to fail again when the file is closed.
                    self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across batches
                    self._size = self._file.tell()
                end, size = done, self._size
                while end < len(lines) and (size == 0 or size + len(lines[end]) <= self.spec.max_bytes):
                    size += len(lines[end])
                    end += 1
                if end > done:
                    view = memoryview(b"".join(lines[done:end]))
                    while view:
                        view = view[self._file.write(view):]
                    self._size, done = size, end
                if done < len(lines):  # the next line does not fit: a new file
                    self._file.close()
                    self._file = None
                    rotate(path, self.spec.backups)
        except Exception as exc:
            return done, exc
        return done, None

    # -- CloudEvents over HTTP ----------------------------------------------------------------------
    def _post(self, record: Record) -> None:
        when, model, version, variant, _, _, trace, _, _ = record
        rid, request, response = self._docs(record)
        url = urlsplit(self.spec.sink)
        source = self.spec.source or f"http://{self._host}/v2/models/{model}"
        common = {
            "ce-specversion": "1.0", "ce-id": rid, "ce-source": source, "ce-time": self._stamp(when),
            "ce-inferenceservicename": model, "ce-namespace": self.spec.namespace, "ce-component": "predictor",
            "ce-endpoint": variant, "ce-metadata": orjson.dumps({"version": [version]} if version else {}).decode(),
            "content-type": "application/json",
        }
        if trace is not None:
            common["ce-traceparent"] = f"00-{trace[0]}-{trace[1]}-{trace[2]}"
        for kind, body in ((CE_REQUEST, request), (CE_RESPONSE, response)):
            data = orjson.dumps(body)
            if self._conn is None:
                import http.client

                cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
                self._conn = cls(url.hostname or "localhost", url.port, timeout=self.spec.timeout_s)
            self._conn.request("POST", url.path or "/", data, {**common, "ce-type": kind})
            answer = self._conn.getresponse()
            answer.read()
            if answer.status >= 300:
                raise OSError(f"the sink answered {answer.status}")

    def close(self, timeout_s: float) -> None:
        """Write what is buffered (for at most ``timeout_s``) and stop the thread."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)


def uuid4_hex() -> str:
    """What ``uuid.uuid4().hex`` gives (16 random bytes, version 4, the RFC 4122 variant) without
    making a UUID object: a record without an id gets one on the sink's thread."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def rotate(path: Path, backups: int) -> None:
    """``path`` becomes ``path.1``, ``path.1`` becomes ``path.2``… keeping ``backups`` files."""
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        path.replace(path.with_name(f"{path.name}.1"))


class PayloadLogger:
    """The sinks of a server and which model logs to which (the engine's ``offer`` is the hot path)."""

    def __init__(self, specs: Mapping[str, PayloadLogSpec | None], written: Counter, dropped: Counter) -> None:
        self._specs = dict(specs)  # "" is the global spec
        self._written = written
        self._dropped = dropped
        self._sinks: dict[str, PayloadSink] = {}
        self._lock = threading.Lock()
        self._random = random.random

    def _sink(self, spec: PayloadLogSpec) -> PayloadSink:
        sink = self._sinks.get(spec.sink)
        if sink is None:
            with self._lock:
                sink = self._sinks.get(spec.sink)
                if sink is None:
                    sink = self._sinks[spec.sink] = PayloadSink(spec, self._written, self._dropped)
        return sink

    def pick(self, model: str) -> PayloadSink | None:
        """Draw the sample for one answered request of ``model``: its sink when it is chosen, else
        None. The engine calls this before it reads or builds anything for the record, so a
        request not chosen costs two dict lookups and a random number."""
        spec = self._specs.get(model, self._specs.get(""))  # a model's own None turns it off
        if spec is None or self._random() >= spec.sample:
            return None
        return self._sinks.get(spec.sink) or self._sink(spec)

    def put(self, sink: PayloadSink, model: str, version: str, variant: str, route: str, rid: str | None,
            inputs: Batch, outputs: Batch) -> None:
        """Hand a chosen pair (``pick``) to its sink; never blocks, never raises."""
        if not sink.put((time.time(), model, version, variant, route, rid, TRACE.get(), inputs, outputs)):
            self._dropped.labels(model, version, "queue_full").inc()

    def offer(self, model: str, version: str, variant: str, route: str, rid: str | None, inputs: Batch,
              outputs: Batch) -> None:
        """Maybe log one answered request: ``pick``, then ``put`` if it was chosen."""
        sink = self.pick(model)
        if sink is not None:
            self.put(sink, model, version, variant, route, rid, inputs, outputs)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout_s`` a sink) and stop the threads."""
        for sink in list(self._sinks.values()):
            sink.close(timeout_s)
        self._sinks.clear()


def parse_specs(raw: Mapping[str, Any]) -> dict[str, PayloadLogSpec | None]:
    """The config file's ``payload_log`` values ("" the global one, then per model) as specs."""
    base = parse_payload_log(raw[""], "config") if "" in raw else None
    out: dict[str, PayloadLogSpec | None] = {"": base} if "" in raw else {}
    for name, value in raw.items():
        if name:
            out[name] = parse_payload_log(value, f"config: models.{name}", base)
    return out
