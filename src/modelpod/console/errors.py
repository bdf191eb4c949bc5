"""Recent errors for the console: the server's own warning and error log records, kept in a ring.

The server already logs what went wrong (failed requests with their id, failed loads, a route's
variant that did not load); a logging handler keeps the last ones for the page, so nothing is
added to the request path. Client errors (4xx) are not logged; the sampler counts them instead
(``History.events``), and the page shows both.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from modelpod.serving.logs import LOGGER

RECENT = 200
_FIELD_CHARS = 500


class RecentErrors(logging.Handler):
    """A handler on the ``modelpod`` logger that keeps the last ``RECENT`` warnings and errors."""

    def __init__(self, size: int = RECENT) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self._logger: logging.Logger | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "fields", None)
            clean = {str(k): _short(v) for k, v in fields.items()} if isinstance(fields, dict) else {}
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                clean.setdefault("exception", _short(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"))
            self.records.append({"t": round(record.created, 3), "kind": "log", "level": record.levelname.lower(),
                                 "logger": record.name, "message": message, "fields": clean})
        except Exception:  # a log handler never raises into its caller
            self.handleError(record)

    def snapshot(self) -> list[dict[str, Any]]:
        """The records kept, oldest first (model threads log too: copied under the handler's lock)."""
        self.acquire()
        try:
            return list(self.records)
        finally:
            self.release()

    def attach(self) -> None:
        if self._logger is None:
            self._logger = logging.getLogger(LOGGER)
            self._logger.addHandler(self)

    def detach(self) -> None:
        if self._logger is not None:
            self._logger.removeHandler(self)
            self._logger = None


def _short(value: Any) -> Any:
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    text = str(value)
    return text if len(text) <= _FIELD_CHARS else text[:_FIELD_CHARS] + "…"
