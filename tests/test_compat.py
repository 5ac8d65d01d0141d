"""The pyspark 3.5 / 4.x layer (``workerbridge.driver.compat``) and the no-warnings promise.

Runs in both environments of ``make test``: the default one (pyspark 4.x, pandas 2)
and ``.venv-compat`` (pyspark 3.5, pandas 2).  Oracles: Spark's own ``collect()`` and
``schema``; Python's warnings machinery for what a user would see.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest

from workerbridge import R, cli, spark_apply
from workerbridge.driver import compat
from workerbridge.wire.errors import BadInputError

COMPAT_WARNINGS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
# pyspark 4.x's own warning for pandas >= 3 (outside its supported range): the one
# warning allowed when a user chose pandas 3 (the default install has pandas 2).
PANDAS3_NOTICE = "PySpark does not yet fully support pandas >= 3"


def _pandas3() -> bool:
    return compat.parse_version(pd.__version__) >= (3, 0, 0)


def _inside_pyspark35(w) -> bool:
    """pyspark 3.5's own DeprecationWarnings (distutils' LooseVersion, pandas 2's
    ``is_datetime64tz_dtype``): raised in pyspark's code, so Python's default filters
    hide them from users; 3.5 gets no fix for them.  Anything in our code still counts."""
    import pyspark
    home = os.path.dirname(os.path.abspath(pyspark.__file__))
    return (not compat.is_spark4() and issubclass(w.category, DeprecationWarning)
            and os.path.abspath(w.filename).startswith(home + os.sep))


def _compat_warnings(caught) -> list[str]:
    found = []
    for w in caught:
        if not issubclass(w.category, COMPAT_WARNINGS) or _inside_pyspark35(w):
            continue
        if _pandas3() and PANDAS3_NOTICE in str(w.message):
            continue
        found.append(f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}")
    return found


def test_plain_spark_apply_emits_no_compatibility_warning(spark):
    df = spark.range(0, 40, numPartitions=2).selectExpr("id", "CAST(id AS double) / 2 AS x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        given = spark_apply(df, lambda d: d.assign(y=d.x * 2), schema="id long, x double, y double")
        inferred = spark_apply(df, lambda d: d.assign(y=d.x * 2))
        rows_given, rows_inferred = given.collect(), inferred.collect()
        listed = spark_apply(df, lambda d: len(d), fetch_result_as_sdf=False)
        rows_r = spark_apply(df, R("function(d) d"), schema="id long, x double").count()
    assert len(rows_given) == len(rows_inferred) == rows_r == 40
    assert sorted(listed) == [20, 20]
    assert _compat_warnings(caught) == []


def test_to_arrow_matches_spark_collect(spark):
    df = spark.createDataFrame(
        [(1, "a", 1.5, dt.date(2024, 2, 29), dt.datetime(2024, 1, 1, 12, 30), Decimal("1.25"),
          [1, 2], {"k": 1}),
         (None, None, None, None, None, None, None, None)],
        "i long, s string, d double, day date, ts timestamp, dec decimal(10,2), "
        "arr array<int>, m map<string,int>")
    table = compat.to_arrow(df)
    assert isinstance(table, pa.Table)
    assert table.column_names == df.columns
    want = [r.asDict() for r in df.collect()]
    got = table.to_pylist()
    for row in got:                     # Arrow gives zoned timestamps and maps as pairs
        if row["ts"] is not None:
            row["ts"] = row["ts"].astimezone(dt.timezone.utc).replace(tzinfo=None)
        if row["m"] is not None:
            row["m"] = dict(row["m"])
    assert got == want


def test_to_arrow_of_no_rows_has_the_schema(spark):
    df = spark.range(0, 10).selectExpr("id", "CAST(id AS string) AS s").where("id < 0")
    table = compat.to_arrow(df)
    assert table.num_rows == 0
    assert table.schema.names == ["id", "s"]
    assert pa.types.is_int64(table.schema.field("id").type)
    assert pa.types.is_string(table.schema.field("s").type) or \
        pa.types.is_large_string(table.schema.field("s").type)


def test_arrow_schema_is_what_map_in_arrow_accepts(spark):
    from pyspark.sql.types import StructType
    struct = StructType.fromJson(spark.range(1).selectExpr(
        "id", "CAST(id AS timestamp) AS ts", "CAST(id AS string) AS s").schema.jsonValue())
    schema = compat.to_arrow_schema(struct)
    assert schema.names == ["id", "ts", "s"]
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")

    def echo(batches):
        for b in batches:
            yield pa.RecordBatch.from_arrays(b.columns, schema=schema)
    out = spark.range(3).selectExpr("id", "CAST(id AS timestamp) AS ts",
                                    "CAST(id AS string) AS s").mapInArrow(echo, struct)
    assert sorted(r.id for r in out.collect()) == [0, 1, 2]


def test_pyspark_version_is_the_installed_one():
    import pyspark
    version = compat.pyspark_version()
    assert ".".join(map(str, version)).startswith(pyspark.__version__.split("rc")[0][:3])
    assert version >= compat.MIN_PYSPARK
    assert compat.java_majors(version), f"no Java versions known for pyspark {version}"
    assert compat.suits_java(version, 17)        # both lines run on Java 17


@pytest.mark.parametrize("spark_version, java, ok", [
    ((3, 5, 0), 8, True), ((3, 5, 9), 11, True), ((3, 5, 9), 21, False),
    ((4, 0, 1), 11, False), ((4, 2, 0), 21, True), ((5, 0, 0), 17, True), ((3, 4, 0), 17, False),
])
def test_java_table(spark_version, java, ok):
    assert compat.suits_java(spark_version, java) is ok


def test_doctor_names_pyspark_and_whether_java_suits_it():
    import pyspark
    check = cli.check_java()                    # the machine's real Java
    assert check.ok, check.line()
    assert f"suits pyspark {pyspark.__version__}" in check.detail


def test_doctor_flags_a_java_the_pyspark_does_not_run_on(tmp_path, monkeypatch):
    import pyspark
    java = tmp_path / "bin" / "java"            # a JAVA_HOME whose java is version 9
    java.parent.mkdir()
    java.write_text('#!/bin/sh\necho \'openjdk version "9.0.4" 2018-01-16\' >&2\n')
    java.chmod(0o700)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    check = cli.check_java()
    assert not check.ok
    majors = "/".join(map(str, compat.java_majors(compat.pyspark_version())))
    assert f"does not suit pyspark {pyspark.__version__} (it runs on Java {majors})" \
        in check.detail
    assert "openjdk-17" in check.fix


def test_too_old_a_pyspark_is_a_clear_error():
    import pyspark
    compat.require_pyspark()                    # the installed one is supported
    with pytest.raises(BadInputError) as e:
        compat.require_pyspark((99, 0), "a future feature")
    assert str(e.value).startswith("a future feature needs pyspark 99.0 or newer; this driver "
                                   f"has pyspark {pyspark.__version__.split('.dev')[0]}")
