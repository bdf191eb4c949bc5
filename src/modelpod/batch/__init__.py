"""Batch scoring: files of any size through a pod, streamed, resumable, sharded (``modelpod batch``).

``run`` scores files and returns a ``BatchSummary``; ``merge`` joins finished shards; ``spark_udf``
gives a Spark pandas UDF. Needs the ``batch`` extra (pyarrow); imported lazily so ``import
modelpod.batch`` works without it and says what to install when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpod.batch.api import run
    from modelpod.batch.job import BatchOptions, BatchSummary
    from modelpod.batch.shards import MergeSummary, merge
    from modelpod.batch.spark import spark_udf

__all__ = ["BatchOptions", "BatchSummary", "MergeSummary", "merge", "run", "spark_udf"]

_WHERE = {"run": "api", "BatchOptions": "job", "BatchSummary": "job", "MergeSummary": "shards", "merge": "shards",
          "spark_udf": "spark"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"modelpod.batch.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'modelpod.batch' has no attribute {name!r}")
