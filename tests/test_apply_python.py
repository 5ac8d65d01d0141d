"""spark_apply with Python closures on a real local Spark, real PyScript children."""

from __future__ import annotations

import datetime as dt
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from workerbridge import spark_apply, spark_log
from workerbridge.wire.errors import BadInputError
from workerbridge.wire.logline import parse_line


def typed_frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    base = dt.datetime(2021, 3, 4, 5, 6, 7, 123456, tzinfo=dt.timezone.utc)
    frame = pd.DataFrame({
        "i": pd.array(rng.integers(-1000, 1000, n), dtype="Int32"),
        "l": pd.array(rng.integers(-2**62, 2**62, n), dtype="Int64"),
        "d": rng.normal(size=n),
        "s": [f"row {k} ü€" if k % 7 else "" for k in range(n)],
        "b": pd.array(rng.integers(0, 2, n).astype(bool), dtype="boolean"),
        "day": [dt.date(1960, 1, 1) + dt.timedelta(days=int(k) * 97) for k in range(n)],
        "ts": [base + dt.timedelta(seconds=int(k) * 3601, microseconds=int(k)) for k in range(n)],
    })
    # nulls in every column
    for col in frame.columns:
        frame.loc[frame.index % 11 == 3, col] = None
    return frame


DDL = "i int, l long, d double, s string, b boolean, day date, ts timestamp"


def plain_rows(frame: pd.DataFrame) -> list:
    """The frame as tuples of Python values and None (pyspark 3.5's createDataFrame does
    not take pandas' nullable dtypes nor pandas Timestamps)."""
    def plain(v):
        if v is None or v is pd.NaT or (not isinstance(v, str) and pd.isna(v)):
            return None
        return v.to_pydatetime() if isinstance(v, pd.Timestamp) else v
    return list(zip(*([plain(v) for v in frame[c].tolist()] for c in frame.columns)))


@pytest.fixture(scope="module")
def typed_df(spark):
    return spark.createDataFrame(plain_rows(typed_frame()), schema=DDL).repartition(3)


def rows(df) -> list:
    return sorted((tuple(r) for r in df.collect()), key=repr)


def test_identity_every_type_with_nulls(spark, typed_df):
    out = spark_apply(typed_df, lambda d: d, schema=typed_df.schema)
    assert out.schema == typed_df.schema
    assert rows(out) == rows(typed_df)


def test_identity_inferred_schema_keeps_types(spark, typed_df):
    out = spark_apply(typed_df, lambda d: d)
    assert [f.name for f in out.schema] == [f.name for f in typed_df.schema]
    assert [f.dataType for f in out.schema] == [f.dataType for f in typed_df.schema]
    assert rows(out) == rows(typed_df)


def test_transform_equals_pandas_locally(spark):
    pdf = pd.DataFrame({"x": np.arange(1000, dtype="int64"), "y": np.linspace(0, 1, 1000)})
    df = spark.createDataFrame(pdf).repartition(4)

    def f(d):
        return d.assign(z=d.x * d.y + 1, label=np.where(d.x % 2 == 0, "even", "odd"))

    got = spark_apply(df, f).toPandas().sort_values("x").reset_index(drop=True)
    want = f(pdf)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


@pytest.mark.parametrize("how", ["ddl", "struct", "arrow"])
def test_schema_given_three_ways(spark, how):
    from pyspark.sql.types import DoubleType, LongType, StructField, StructType
    df = spark.range(100).repartition(3)
    schema = {
        "ddl": "id long, half double",
        "struct": StructType([StructField("id", LongType()), StructField("half", DoubleType())]),
        "arrow": pa.schema([("id", pa.int64()), ("half", pa.float64())]),
    }[how]
    out = spark_apply(df, lambda d: d.assign(half=d.id / 2), schema=schema)
    assert [(f.name, f.dataType) for f in out.schema] == [("id", LongType()), ("half", DoubleType())]
    assert sorted(out.collect()) == [(i, i / 2) for i in range(100)]


def test_schema_reorders_columns_by_name_and_casts(spark):
    df = spark.range(10)
    out = spark_apply(df, lambda d: d.assign(k=d.id.astype("int32")), schema="k long, id long")
    assert sorted(out.collect()) == [(i, i) for i in range(10)]


def test_context_is_passed(spark):
    df = spark.range(20).repartition(2)
    ctx = {"offset": 100, "tag": "ctx"}
    out = spark_apply(df, lambda d, c: d.assign(id=d.id + c["offset"], tag=c["tag"]), context=ctx)
    assert sorted(out.collect()) == [(i + 100, "ctx") for i in range(20)]


@pytest.mark.parametrize("result, expected", [
    (lambda d: d.id * 3, lambda ids: sorted(i * 3 for i in ids)),
    (lambda d: list(d.id + 1), lambda ids: sorted(i + 1 for i in ids)),
    (lambda d: (d.id * 1.5).to_numpy(), lambda ids: sorted(i * 1.5 for i in ids)),
    (lambda d: len(d), None),
], ids=["series", "list", "array", "scalar"])
def test_vector_results_become_result_column(spark, result, expected):
    df = spark.range(30).repartition(3)
    out = spark_apply(df, result)
    assert out.columns == ["result"]
    values = sorted(r.result for r in out.collect())
    if expected is None:                       # one row per partition: its size
        assert sum(values) == 30 and len(values) == 3
    else:
        assert values == expected(range(30))


def test_arrow_and_dict_results(spark):
    df = spark.range(10).repartition(2)
    out = spark_apply(df, lambda d: pa.table({"id": pa.array(d.id.to_numpy()), "k": ["a"] * len(d)}))
    assert sorted(out.collect()) == [(i, "a") for i in range(10)]
    out = spark_apply(df, lambda d: {"n": len(d), "total": int(d.id.sum())})
    assert sum(r.n for r in out.collect()) == 10
    out = spark_apply(df, lambda d: [d.iloc[:1], d.iloc[1:]])
    assert sorted(r.id for r in out.collect()) == list(range(10))


def test_input_as_arrow_table(spark):
    df = spark.range(10).repartition(2)
    out = spark_apply(df, lambda t: t.append_column("is_table", pa.array([isinstance(t, pa.Table)] * t.num_rows)),
                      input="arrow")
    assert all(r.is_table for r in out.collect())


def test_empty_partitions_start_no_child(spark):
    df = spark.range(4).repartition(8)          # at least 4 of 8 partitions are empty
    out = spark_apply(df, lambda d: d.assign(id=d.id + 1), schema="id long")
    assert sorted(r.id for r in out.collect()) == [1, 2, 3, 4]
    lines = spark_log(spark, n=None)
    empty = [ln for ln in lines if "is empty; no child started" in ln]
    assert len(empty) >= 4
    for ln in empty:
        ident = parse_line(ln)["id"]
        assert not any(f"({ident}) started PyScript" in x for x in lines)


def test_closure_exception_reaches_driver_with_traceback(spark):
    df = spark.range(10).repartition(2)

    def explode(d):
        raise KeyError("no such column: späm")

    with pytest.raises(Exception) as info:
        spark_apply(df, explode, schema="id long").collect()
    text = str(info.value)
    assert "KeyError" in text and "no such column: späm" in text
    assert "PyScript" in text and "Python" in text
    assert re.search(r"partition \d", text)
    assert "Traceback (most recent call last)" in text and "in explode" in text


def test_child_exit_and_segfault_are_named(spark):
    df = spark.range(4).repartition(1)

    def leave(d):
        import os
        import sys
        sys.stderr.write("about to leave\n")
        sys.stderr.flush()
        os._exit(7)

    with pytest.raises(Exception) as info:
        spark_apply(df, leave, schema="id long").collect()
    assert "exit code 7" in str(info.value) and "about to leave" in str(info.value)

    def crash(d):
        import ctypes
        ctypes.string_at(0)

    with pytest.raises(Exception) as info:
        spark_apply(df, crash, schema="id long").collect()
    text = str(info.value)
    assert "SIGSEGV(-11)" in text and "partition 0" in text and "PyScript" in text
    assert "Segmentation fault" in text           # the child's own stderr (faulthandler)


def test_result_not_matching_schema_names_the_column(spark):
    df = spark.range(5)
    with pytest.raises(Exception) as info:
        spark_apply(df, lambda d: d.assign(x="text"), schema="id long, x long").collect()
    assert "column 'x'" in str(info.value) and "expected int64" in str(info.value)
    with pytest.raises(Exception) as info:
        spark_apply(df, lambda d: d, schema="other long").collect()
    assert "missing ['other']" in str(info.value)


def test_log_lines_follow_the_format(spark):
    df = spark.range(300).repartition(3)
    marker = spark_log(spark, n=None)
    out = spark_apply(df, lambda d: d, schema="id long")
    assert out.count() == 300
    new = spark_log(spark, n=None)[len(marker):]
    parsed = [parse_line(ln) for ln in new]
    assert all(parsed), [ln for ln, p in zip(new, parsed) if not p]
    retrieved = [int(re.match(r"retrieved (\d+) rows", p["message"]).group(1))
                 for p in parsed if p["role"] == "PyScript" and p["message"].endswith(" rows")
                 and p["message"].startswith("retrieved")]
    assert sum(retrieved) == 300 and len(retrieved) == 3
    by_task: dict = {}
    for p in parsed:
        by_task.setdefault(p["id"], []).append((p["role"], p["message"]))
    tasks = [t for t, msgs in by_task.items() if ("Worker", "Python process completed") in msgs]
    assert len(tasks) == 3
    for t in tasks:
        msgs = [m for _, m in by_task[t]]
        for want in ("is connected to backend", "retrieved 1 column names", "finished"):
            assert want in msgs
        assert any(m.startswith("partition ") and m.endswith("compute starting") for m in msgs)
        assert any(m.startswith("started PyScript (pid ") for m in msgs)
        assert any(m.startswith("applied closure to ") for m in msgs)
        assert any(m.startswith("returned ") for m in msgs)
        assert f"accepted registration of Worker ({t})" in " ".join(
            p["message"] for p in parsed if p["role"] == "Gateway")
    assert spark_log(spark, filter="PyScript", n=2) == [ln for ln in new if "PyScript" in ln][-2:]


def test_log_file_gets_every_line(spark):
    from workerbridge.driver.api import log_path
    spark_apply(spark.range(3), lambda d: d, schema="id long").collect()
    path = log_path(spark)
    assert path and os.path.isfile(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert spark_log(spark, n=1)[0] in text


def test_closure_log_lines(spark):
    def f(d):
        import workerbridge
        workerbridge.log(f"saw {len(d)} rows")
        workerbridge.log("careful", level="WARN")
        return d
    spark_apply(spark.range(5).repartition(1), f, schema="id long").collect()
    lines = spark_log(spark, filter="PyClosure", n=2)
    assert lines[0].endswith("saw 5 rows") and " INFO " in lines[0]
    assert " WARN " in lines[1] and lines[1].endswith("careful")


def test_unpicklable_closure_names_the_capture(spark):
    import threading
    lock = threading.Lock()
    with pytest.raises(BadInputError, match="variable 'lock'"):
        spark_apply(spark.range(3), lambda d: d if lock else d)


def test_wrong_python_is_a_clear_error(spark):
    with pytest.raises(Exception) as info:
        spark_apply(spark.range(3), lambda d: d, schema="id long",
                    python="/nonexistent/python3").collect()
    assert "Python interpreter not found" in str(info.value)
