"""``spark_udf`` in pyspark's local mode on Debian's JDK: the pod scores Spark columns, shipped by addFile."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batchutil import features

from modelpod.store import Store

pyspark = pytest.importorskip("pyspark", reason="pyspark is in the dev extra")
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Loopback only: Spark would otherwise bind the machine's first interface.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Spark's Python workers run this interpreter (the venv), not the first python3 on PATH.
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    if shutil.which("java") is None:
        pytest.fail("java is not installed (.ci/setup-system.sh installs openjdk-17-jre-headless)")
    from pyspark.sql import SparkSession

    tmp = tmp_path_factory.mktemp("spark")
    session = (SparkSession.builder.master("local[2]").appName("modelpod-batch-test")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
               .config("spark.local.dir", str(tmp)).config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


def test_spark_udf_stacks_columns_into_the_models_input(spark: Any, store: Store, estimator: Any) -> None:
    from pyspark.sql import functions as F

    from modelpod.batch import spark_udf

    x = features(500, seed=11)
    rows = [(i, *map(float, r)) for i, r in enumerate(x)]
    names = ["id", *(f"f{i}" for i in range(20))]
    df = spark.createDataFrame(rows, names).repartition(3)
    df = df.select("id", *(F.col(f"f{i}").cast("float").alias(f"f{i}") for i in range(20)))
    udf = spark_udf(spark, "lr@production", store=store)
    scored = df.select("id", udf(*(f"f{i}" for i in range(20))).alias("label")).orderBy("id").collect()
    assert [r["id"] for r in scored] == list(range(500))
    assert [r["label"] for r in scored] == estimator.predict(x).tolist()


def test_spark_udf_named_inputs_and_refusals(spark: Any, store: Store) -> None:
    from modelpod.batch import spark_udf

    df = spark.createDataFrame([(1.5, "ab"), (2.0, "xyz")], "age float, city string")
    udf = spark_udf(spark, "named", store=store)
    got = [r[0] for r in df.select(udf("age", "city")).collect()]
    assert got == [pytest.approx(5.0), pytest.approx(7.0)]
    doubles = spark.createDataFrame([(1.5, "ab")], "age double, city string")
    with pytest.raises(Exception, match="input 'age' takes FP32"):
        doubles.select(udf("age", "city")).collect()
    cast = spark_udf(spark, "named", store=store, cast=True)
    assert [r[0] for r in doubles.select(cast("age", "city")).collect()] == [pytest.approx(5.0)]


def test_pod_archive_is_unpacked_and_verified_once(spark: Any, store: Store) -> None:
    from modelpod.batch import spark as spark_module

    digest = store.open("picky").digest
    dest = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelpod-spark-{digest[7:23]}"
    udf = spark_module.spark_udf(spark, "picky", store=store)
    df = spark.createDataFrame([(float(v),) for v in range(10)], "x float")
    assert [r[0] for r in df.select(udf("x")).collect()] == [v + 1.0 for v in range(10)]
    assert (dest / "modelpod.yaml").is_file()
    assert np.isfinite(len(list(dest.iterdir())))
