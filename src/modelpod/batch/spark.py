"""``spark_udf``: a pod as a Spark pandas UDF (Arrow batches), as MLflow users know ``spark_udf``.

The driver writes the pod as an archive and ships it with ``SparkContext.addFile``; each Python
worker unpacks and verifies it once (by digest) and keeps the loaded model. Columns reach the model
through the same mapping and checks as ``modelpod batch``; a row the model cannot score fails the
task with its reason (a UDF cannot quarantine rows; ``modelpod batch`` can).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.batch.job import Scorer
from modelpod.batch.sources import RawBatch, pyarrow
from modelpod.batch.tensors import Binding, bind, convert
from modelpod.errors import BatchError, MissingExtraError
from modelpod.model import Model
from modelpod.pod import Signature, TensorSpec
from modelpod.settings import Settings
from modelpod.store import Store

_SPARK_TYPES = {"FP16": "float", "FP32": "float", "FP64": "double", "INT8": "byte", "INT16": "short",
                "INT32": "int", "INT64": "long", "UINT8": "short", "UINT16": "int", "UINT32": "long",
                "UINT64": "long", "BOOL": "boolean", "BYTES": "string"}
_models: dict[str, Model] = {}
_lock = threading.Lock()


def result_type(signature: Signature) -> str:
    """The Spark DDL type of the UDF's result: one output's type, or a struct of every output."""
    def one(t: TensorSpec) -> str:
        base = _SPARK_TYPES[t.datatype]
        return base if len(t.shape) <= 1 else f"array<{base}>" if len(t.shape) == 2 else f"array<array<{base}>>"

    outs = signature.outputs
    if not outs:
        raise BatchError("the pod's signature lists no outputs, so the UDF's type is unknown; pass result_type")
    if len(outs) == 1:
        return one(outs[0])
    return "struct<" + ",".join(f"`{t.name}`:{one(t)}" for t in outs) + ">"


def spark_udf(spark: Any, ref: str | Path, *, columns: Sequence[str] | None = None, cast: bool = False,
              result_type_ddl: str | None = None, store: Store | None = None,
              settings: Settings | None = None) -> Any:
    """A pandas UDF scoring its argument columns with pod ``ref``: ``df.select(udf("a", "b"))``.

    The arguments are named ``columns`` (default: the model's input names when their count matches,
    else they are stacked into the single input, in order).
    """
    try:
        from pyspark.sql.functions import pandas_udf
    except ImportError:
        raise MissingExtraError("spark", "pyspark", "spark_udf") from None
    from modelpod.api import open_pod
    from modelpod.archive import export

    pod = open_pod(ref, store=store, settings=settings)
    digest = pod.digest
    archive = Path(tempfile.mkdtemp(prefix="modelpod-spark-")) / f"{digest[7:23]}.tar"
    export(pod, archive)
    spark.sparkContext.addFile(str(archive))
    signature = pod.manifest.signature
    ddl = result_type_ddl or result_type(signature)
    names = tuple(columns) if columns else None
    outputs = [t.name for t in signature.outputs]
    multi = len(outputs) > 1

    def score(batches: Iterator[tuple[Any, ...]]) -> Iterator[Any]:
        model = _model(archive.name, digest)
        scorer = Scorer(model)
        bindings: list[Binding] | None = None
        for series in batches:
            series = series if isinstance(series, tuple) else (series,)
            cols = list(names or _default_names(model.signature, len(series)))
            if bindings is None:
                single = len(model.signature.inputs) == 1 and cols[0] != model.signature.inputs[0].name
                bindings = bind(model.signature, cols, "parquet", columns=cols if single else None,
                                where="the UDF's arguments")
            yield _score(scorer, bindings, cols, series, cast, outputs, multi)

    import pandas as pd

    count = len(names) if names else _argument_count(signature)
    series: Any = pd.Series
    arg: Any = Iterator[tuple[series, ...]] if count > 1 else Iterator[series]
    score.__annotations__ = {"batches": arg, "return": Iterator[pd.DataFrame] if multi else Iterator[series]}
    return pandas_udf(score, ddl)


def _argument_count(signature: Signature) -> int:
    """Arguments the UDF takes by default: one per input, or the single input's columns."""
    if len(signature.inputs) != 1:
        return len(signature.inputs)
    shape = signature.inputs[0].shape
    return shape[1] if len(shape) == 2 and shape[1] > 0 else 1


def _default_names(signature: Signature, count: int) -> list[str]:
    if len(signature.inputs) == count:
        return [t.name for t in signature.inputs]
    return [f"_{i}" for i in range(count)]


def _score(scorer: Scorer, bindings: list[Binding], cols: list[str], series: tuple[Any, ...], cast: bool,
           outputs: list[str], multi: bool) -> Any:
    import pandas as pd

    pa = pyarrow()
    rows = len(series[0])
    arrays = {c: pa.Array.from_pandas(s) for c, s in zip(cols, series, strict=True)}
    raw = RawBatch("spark", 0, rows, arrays, {})
    conv = convert(raw, "parquet", bindings, cast)
    if conv.bad:
        k = min(conv.bad)
        raise BatchError(f"row {k} of a Spark batch: {conv.bad[k]}")
    out, at, failed = scorer.predict(conv.inputs, rows)
    if failed:
        k = min(failed)
        raise BatchError(f"row {k} of a Spark batch: {failed[k]}")
    if len(at) != rows or (at != np.arange(rows)).any():  # a UDF answers one value per row
        raise BatchError(f"model {scorer.model.name} answers records, not one row per input row (a detector); "
                         "score it with modelpod batch")

    def column(name: str) -> Any:
        arr = out[name]
        if arr.dtype == object:
            arr = arr.astype(str) if arr.ndim == 1 else arr
            values = [v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
            return pd.Series(values if arr.ndim == 1 else list(arr))
        return pd.Series(arr) if arr.ndim == 1 else pd.Series(list(arr.reshape(rows, -1)))

    if multi:
        return pd.DataFrame({name: column(name) for name in outputs})
    return column(outputs[0])


def _model(name: str, digest: str) -> Model:
    """The model of a shipped archive, unpacked and loaded once per Python worker."""
    with _lock:
        if digest in _models:
            return _models[digest]
        from pyspark import SparkFiles

        from modelpod.archive import extract
        from modelpod.frameworks import require
        from modelpod.pod import Pod

        dest = Path(tempfile.gettempdir()) / f"modelpod-spark-{digest[7:23]}"
        if not (dest / "modelpod.yaml").is_file():
            staging = Path(tempfile.mkdtemp(prefix="modelpod-spark-staging-"))
            extract(Path(SparkFiles.get(name)), staging)
            with contextlib.suppress(OSError):  # another worker on this machine got there first
                staging.rename(dest)
        pod = Pod.open(dest, verify=True, expected_digest=digest)
        model: Model = require(pod.manifest.framework).load(pod)
        model.load()
        _models[digest] = model
        return model
