"""ModelWorker: runs ``Model.predict`` in its own threads, so the event loop never waits on a model.

One worker per loaded model version; its pool has ``max_concurrency`` threads, which is also how
many batches of that model may run at once. A batch crosses to the thread once and its result
comes back once: no per-request threads.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from modelpod.errors import InferenceError, ModelpodError
from modelpod.model import Batch, Model


class ModelWorker:
    def __init__(self, model: Model, label: str, threads: int = 1) -> None:
        self.model = model
        self.label = label
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=f"modelpod-{label}")

    async def predict(self, batch: Batch) -> Batch:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, batch)

    def _call(self, batch: Batch) -> Batch:
        try:
            out = self.model.predict(batch)
        except ModelpodError:
            raise
        except Exception as exc:  # the model's own failure: report it, keep serving
            raise InferenceError(f"model {self.label} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, dict):
            raise InferenceError(f"model {self.label} returned {type(out).__name__}, not a dict of arrays")
        return {str(k): v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in out.items()}

    def close(self) -> None:
        """Stop the threads once the running batch (if any) is done; never blocks the caller."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"ModelWorker({self.label})"


def rows_of(batch: Batch) -> int | None:
    """The shared first dimension of every input, or None when they disagree (cannot be merged)."""
    rows: int | None = None
    for arr in batch.values():
        if arr.ndim == 0:
            return None
        n = int(arr.shape[0])
        if rows is None:
            rows = n
        elif rows != n:
            return None
    return rows


def merge_key(batch: Batch) -> tuple[Any, ...]:
    """Requests with equal keys can be concatenated along rows: same names, dtypes, trailing dims."""
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in batch.items())
