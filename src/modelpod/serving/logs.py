"""Structured logs: one JSON object per line on stderr.

Call sites pass their fields as ``extra={"fields": {...}}``; the formatter merges them into the
object next to ``ts``, ``level``, ``logger`` and ``msg``.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any

import orjson

from modelpod.observe.context import TRACE

LOGGER = "modelpod"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace = TRACE.get()
        if trace is not None:  # the request being answered was traced (observe/tracing.py)
            data["trace_id"], data["span_id"] = trace[0], trace[1]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = " ".join(f"{k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        trace = TRACE.get()
        if trace is not None:
            extra = f"{extra} trace_id={trace[0]}".lstrip()
        line = f"{record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", json: bool = True) -> None:
    """Send modelpod's logs to stderr (replacing an earlier call's handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler._modelpod = True  # type: ignore[attr-defined]
    # asyncio reports errors in callbacks through its own logger: keep those one JSON line too.
    for name, lvl in ((LOGGER, level), ("asyncio", "warning")):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if getattr(old, "_modelpod", False):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(getattr(logging, lvl.upper(), logging.INFO))
        logger.propagate = False
