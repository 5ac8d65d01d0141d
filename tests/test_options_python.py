"""spark_apply options with Python closures: group_by, partition index, fetch, barrier, name, env."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from workerbridge import R, spark_apply, spark_log
from workerbridge.wire.errors import BadInputError
from workerbridge.wire.logline import is_sample_id, parse_line


@pytest.fixture(scope="module")
def groups_df(spark):
    n = 30_000
    pdf = pd.DataFrame({"g": np.array(["a", "b", "c"])[np.arange(n) % 3],
                        "x": np.arange(n, dtype="int64"), "y": np.arange(n) * 0.5})
    return spark.createDataFrame(pdf).repartition(5)


@pytest.mark.parametrize("lang", ["python", "r"])
def test_group_by_calls_f_once_per_whole_group(spark, groups_df, lang):
    def f(d):
        import workerbridge
        workerbridge.log(f"group-call {d.g.iloc[0]} {len(d)}")
        return pd.DataFrame({"n": [len(d)], "total": [int(d.x.sum())]})

    r_code = ("function(d) { worker_log('group-call ', d$g[1], ' ', nrow(d)); "
              "data.frame(n = nrow(d), total = sum(d$x)) }")
    before = len(spark_log(spark, filter="group-call", n=None))
    out = spark_apply(groups_df, f if lang == "python" else R(r_code), group_by="g",
                      schema="n long, total long")
    assert out.columns == ["g", "n", "total"]            # group column put in front
    got = sorted(tuple(r) for r in out.collect())
    want = [(g, 10_000, int(sum(range(k, 30_000, 3)))) for k, g in enumerate("abc")]
    assert got == want
    calls = spark_log(spark, filter="group-call", n=None)[before:]
    # exactly once per group, with the whole group (no inference: schema given)
    assert len(calls) == 3 and sorted(c.split()[-2] for c in calls) == ["a", "b", "c"]
    assert all(c.endswith(" 10000") for c in calls)


def test_inference_runs_f_on_the_driver_sample_only(spark, groups_df):
    def f(d):
        import workerbridge
        workerbridge.log(f"infer-call {len(d)}")
        return pd.DataFrame({"n": [len(d)]})

    before = len(spark_log(spark, filter="infer-call", n=None))
    out = spark_apply(groups_df, f, group_by="g", sample_rows=10)
    assert sorted(tuple(r) for r in out.collect()) == [("a", 10000), ("b", 10000), ("c", 10000)]
    lines = spark_log(spark, filter="infer-call", n=None)[before:]
    sample = [c for c in lines if is_sample_id(parse_line(c)["id"])]
    assert sample and sum(int(c.split()[-1]) for c in sample) == 10
    assert len(lines) - len(sample) == 3                  # the cluster never reran it


def test_group_by_several_columns_and_explicit_schema(spark):
    pdf = pd.DataFrame({"k1": [1, 1, 2, 2, 2], "k2": ["x", "y", "x", "x", "y"],
                        "v": [1.0, 2.0, 3.0, 4.0, 5.0]})
    df = spark.createDataFrame(pdf).repartition(2)
    out = spark_apply(df, lambda d: pd.DataFrame({"s": [d.v.sum()]}), group_by=["k1", "k2"],
                      schema="s double")
    assert out.columns == ["k1", "k2", "s"]
    assert sorted(tuple(r) for r in out.collect()) == [(1, "x", 1.0), (1, "y", 2.0),
                                                        (2, "x", 7.0), (2, "y", 5.0)]


def test_group_by_drops_empty_results_and_keeps_null_keys(spark):
    pdf = pd.DataFrame({"k": ["a", "b", None, "a"], "v": [1, 2, 3, 4]})
    df = spark.createDataFrame(pdf, "k string, v long").repartition(2)
    out = spark_apply(df, lambda d: d[d.v > 1], group_by="k", schema="k string, v long")
    assert sorted((tuple(r) for r in out.collect()), key=repr) == sorted(
        [("a", 4), ("b", 2), (None, 3)], key=repr)


def test_group_by_per_group_regression_equals_local(spark):
    rng = np.random.default_rng(1)
    pdf = pd.DataFrame({"g": np.repeat(["p", "q", "r"], 50), "x": rng.normal(size=150)})
    pdf["y"] = pdf.x * np.repeat([1.0, 2.0, 3.0], 50) + rng.normal(scale=0.1, size=150)
    df = spark.createDataFrame(pdf).repartition(3)

    def fit(d):
        slope, intercept = np.polyfit(d.x, d.y, 1)
        return pd.DataFrame({"slope": [slope], "intercept": [intercept]})

    got = spark_apply(df, fit, group_by="g").toPandas().sort_values("g").reset_index(drop=True)
    want = pdf.groupby("g").apply(lambda d: fit(d).iloc[0], include_groups=False).reset_index()
    np.testing.assert_allclose(got[["slope", "intercept"]], want[["slope", "intercept"]])


def test_group_by_equals_apply_in_pandas(spark):
    """Oracle: Spark's own groupBy().applyInPandas with the same closure, over
    700 groups of mixed columns (NaN and None, strings, longs)."""
    rng = np.random.default_rng(7)
    n = 6_000
    pdf = pd.DataFrame({"g": rng.integers(0, 700, n), "x": rng.normal(size=n),
                        "s": rng.choice(np.array(["u", "vé", None], dtype=object), n),
                        "i": rng.integers(-5, 5, n)})
    pdf.loc[rng.random(n) < 0.1, "x"] = np.nan
    df = spark.createDataFrame(pdf, "g long, x double, s string, i long").repartition(3)

    def f(d):      # every row, and values that do not depend on the rows' order
        return d.assign(n=len(d), top=d.x.max(), rank=d.x.rank(method="min"),
                        s=d.s.str.upper(), i=d.i * d.i.sum())

    schema = "g long, x double, s string, i long, n long, top double, rank double"
    ours = spark_apply(df, f, group_by="g", schema=schema).collect()
    theirs = df.groupBy("g").applyInPandas(f, schema).collect()
    assert len(ours) == n
    assert sorted(map(tuple, ours), key=repr) == sorted(map(tuple, theirs), key=repr)


def test_group_results_that_disagree_in_type_fail_clearly(spark):
    """One group returns a bool where another returns a long: an error that
    says so, not True silently made 1."""
    df = spark.createDataFrame(pd.DataFrame({"k": [1, 2, 2], "v": [1, 2, 3]})).coalesce(1)
    with pytest.raises(Exception) as info:
        spark_apply(df, lambda d: pd.DataFrame({"v": [True] if len(d) == 1 else [2]}),
                    group_by="k", schema="v long").collect()
    text = str(info.value)
    assert "do not share one schema" in text and "partition 0" in text and "PyScript" in text


def test_r_group_results_with_different_columns_fail_clearly(spark):
    df = spark.createDataFrame(pd.DataFrame({"k": [1, 2, 2], "v": [1, 2, 3]})).coalesce(1)
    f = R("function(d) if (nrow(d) == 1) data.frame(a = 1) else data.frame(b = 2)")
    with pytest.raises(Exception) as info:
        spark_apply(df, f, group_by="k", schema="a double").collect()
    text = str(info.value)
    assert re.search(r"do not share one set of columns: \(k, ([ab])\) vs \(k, (?!\1)[ab]\)", text)
    assert "RScript" in text and "partition 0" in text


def test_partition_index_param(spark):
    df = spark.range(40).repartition(4)
    out = spark_apply(df, lambda d, index: d.assign(part=index), partition_index_param="index",
                      schema="id long, part int")
    parts = {r.part for r in out.collect()}
    assert parts == {0, 1, 2, 3}


def test_partition_index_with_context(spark):
    df = spark.range(10).repartition(2)
    out = spark_apply(df, lambda d, ctx, part: d.assign(v=ctx + part), context=100,
                      partition_index_param="part", schema="id long, v long")
    assert {r.v for r in out.collect()} == {100, 101}


def test_fetch_result_as_list(spark):
    df = spark.range(30).repartition(3)
    frames = spark_apply(df, lambda d: d.assign(twice=d.id * 2), fetch_result_as_sdf=False)
    assert isinstance(frames, list) and len(frames) == 3
    assert all(isinstance(f, pd.DataFrame) and list(f.columns) == ["id", "twice"] for f in frames)
    assert sorted(int(v) for f in frames for v in f.id) == list(range(30))
    sizes = spark_apply(df, lambda d: len(d), fetch_result_as_sdf=False)
    assert sorted(sizes) == [10, 10, 10]            # repartition(3) deals the rows round-robin


@pytest.mark.parametrize("lang", ["python", "r"])
def test_fetch_result_per_group(spark, groups_df, lang):
    f = (lambda d: pd.DataFrame({"n": [len(d)]})) if lang == "python" \
        else R("function(d) data.frame(n = nrow(d))")
    per_group = spark_apply(groups_df, f, group_by="g", fetch_result_as_sdf=False)
    assert sorted((f.g[0], int(f.n[0])) for f in per_group) == [("a", 10000), ("b", 10000),
                                                                 ("c", 10000)]


def test_barrier_passes_task_addresses(spark):
    df = spark.range(20).repartition(2)

    def f(d, barrier):
        return pd.DataFrame({"part": [barrier["partition"]], "n_addr": [len(barrier["address"])]})

    out = spark_apply(df, f, barrier=True, schema="part int, n_addr int")
    assert sorted(tuple(r) for r in out.collect()) == [(0, 2), (1, 2)]


def test_name_labels_log_lines_and_env_reaches_child(spark):
    df = spark.range(5).repartition(1)

    def f(d):
        import os
        return d.assign(v=os.environ["WB_TEST_VALUE"])

    out = spark_apply(df, f, name="my step", env={"WB_TEST_VALUE": "hello"},
                      schema="id long, v string")
    assert {r.v for r in out.collect()} == {"hello"}
    assert spark_log(spark, filter="compute starting for 'my step'", n=1)


def test_batch_mode_calls_f_per_arrow_batch(spark):
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1000")
    try:
        df = spark.range(10_000).repartition(2)

        def f(d):
            import workerbridge
            workerbridge.log(f"batch-call {len(d)}")
            return d.assign(n=len(d))

        before = len(spark_log(spark, filter="batch-call", n=None))
        out = spark_apply(df, f, schema="id long, n long", batch_mode="batch")
        rows = out.collect()
        assert sorted(r.id for r in rows) == list(range(10_000))
        assert max(r.n for r in rows) <= 1000
        calls = spark_log(spark, filter="batch-call", n=None)[before:]
        assert len(calls) >= 10 and all(int(c.split()[-1]) <= 1000 for c in calls)
        assert spark_log(spark, filter="batches", n=1)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


def test_batch_mode_error_mid_stream_fails_the_task(spark):
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
    try:
        df = spark.range(1000).repartition(1)

        def f(d):
            if d.id.max() > 500:
                raise ValueError("late failure")
            return d

        with pytest.raises(Exception, match="late failure"):
            spark_apply(df, f, schema="id long", batch_mode="batch").collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
