"""sparklyr's spark_apply behaviours (tests/testthat/test-spark_apply.R), ported, for both children.

Each case runs the same behaviour as a Python closure and as R code, and asserts
real values."""

from __future__ import annotations

import datetime as dt
import subprocess

import numpy as np
import pandas as pd
import pytest
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

from workerbridge import R, spark_apply

LANGS = ["python", "r"]


def pick(lang, py, r_code):
    return py if lang == "python" else R(r_code)


@pytest.fixture(scope="module")
def iris_df(spark):
    import sys
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    from iris import iris
    return spark.createDataFrame(iris()).repartition(3)


@pytest.mark.parametrize("lang", LANGS)
def test_identity_keeps_every_row(spark, iris_df, lang):
    out = spark_apply(iris_df, pick(lang, lambda d: d, "function(e) e"))
    assert sorted(map(tuple, out.collect())) == sorted(map(tuple, iris_df.collect()))


@pytest.mark.parametrize("lang", LANGS)
def test_group_by_counts_rows_per_group(spark, iris_df, lang):
    f = pick(lang, lambda d: pd.DataFrame({"n": [len(d)]}), "function(e) data.frame(n = nrow(e))")
    out = spark_apply(iris_df, f, group_by="Species")
    assert sorted(tuple(r) for r in out.collect()) == [("setosa", 50), ("versicolor", 50),
                                                        ("virginica", 50)]


def _r_lm_directly(pdf: pd.DataFrame) -> dict:
    """Per-group lm coefficients from R itself, outside workerbridge."""
    script = ("d <- read.csv(file('stdin'), stringsAsFactors = FALSE);"
              "for (g in sort(unique(d$g))) { m <- lm(y ~ x, d[d$g == g, ]);"
              " cat(g, sprintf('%.15g', coef(m)), '\\n') }")
    out = subprocess.run(["Rscript", "--vanilla", "-e", script], input=pdf.to_csv(index=False),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in out.strip().splitlines()}


def test_group_by_lm_equals_r_run_directly(spark):
    rng = np.random.default_rng(3)
    pdf = pd.DataFrame({"g": np.repeat(["a", "b", "c"], 40), "x": rng.normal(size=120)})
    pdf["y"] = 2 + pdf.x * np.repeat([1.0, -2.0, 0.5], 40) + rng.normal(scale=0.3, size=120)
    df = spark.createDataFrame(pdf).repartition(4)
    code = "function(e) { m <- lm(y ~ x, e); data.frame(intercept = coef(m)[[1]], slope = coef(m)[[2]]) }"
    got = {r.g: [r.intercept, r.slope] for r in spark_apply(df, R(code), group_by="g").collect()}
    want = _r_lm_directly(pdf)
    assert set(got) == set(want) == {"a", "b", "c"}
    for g in want:
        np.testing.assert_allclose(got[g], want[g], rtol=1e-9)


@pytest.mark.parametrize("lang", LANGS)
def test_group_by_several_columns(spark, lang):
    pdf = pd.DataFrame({"a": [1, 1, 2, 2], "b": ["x", "y", "x", "x"], "v": [1.0, 2.0, 3.0, 4.0]})
    df = spark.createDataFrame(pdf).repartition(2)
    f = pick(lang, lambda d: pd.DataFrame({"s": [d.v.sum()]}), "function(e) data.frame(s = sum(e$v))")
    out = spark_apply(df, f, group_by=["a", "b"])
    assert out.columns == ["a", "b", "s"]
    assert sorted(tuple(r) for r in out.collect()) == [(1, "x", 1.0), (1, "y", 2.0), (2, "x", 7.0)]


@pytest.mark.parametrize("how", ["ddl", "struct", "names-by-ddl"])
@pytest.mark.parametrize("lang", LANGS)
def test_columns_given_as_ddl_or_struct(spark, iris_df, lang, how):
    f = pick(lang, lambda d: pd.DataFrame({"sp": d.Species, "pw": d.Petal_Width}),
             "function(e) data.frame(sp = e$Species, pw = e$Petal_Width)")
    schema = {"ddl": "sp string, pw double",
              "struct": StructType([StructField("sp", StringType()), StructField("pw", DoubleType())]),
              "names-by-ddl": "pw double, sp string"}[how]
    out = spark_apply(iris_df, f, schema=schema)
    rows = out.collect()
    assert len(rows) == 150 and {r.sp for r in rows} == {"setosa", "versicolor", "virginica"}
    assert abs(sum(r.pw for r in rows) - 179.9) < 1e-9


@pytest.mark.parametrize("lang", LANGS)
def test_fetch_result_as_list(spark, lang):
    df = spark.range(12).repartition(3)
    f = pick(lang, lambda d: len(d), "function(e) nrow(e)")
    sizes = spark_apply(df, f, fetch_result_as_sdf=False)
    assert len(sizes) == 3 and sum(sizes) == 12
    g = pick(lang, lambda d: d.assign(k="x"), "function(e) { e$k <- 'x'; e }")
    frames = spark_apply(df, g, fetch_result_as_sdf=False)
    assert all(isinstance(f_, pd.DataFrame) for f_ in frames)
    assert sorted(int(v) for f_ in frames for v in f_["id"]) == list(range(12))


@pytest.mark.parametrize("lang", LANGS)
def test_partition_index(spark, lang):
    df = spark.range(30).repartition(3)
    f = pick(lang, lambda d, idx: pd.DataFrame({"idx": [idx]}), "function(e, idx) data.frame(idx = idx)")
    out = spark_apply(df, f, partition_index_param="idx", schema="idx long")
    assert sorted(r.idx for r in out.collect()) == [0, 1, 2]


@pytest.mark.parametrize("lang", LANGS)
def test_filter_add_and_concatenate(spark, iris_df, lang):
    f = pick(lang,
             lambda d: d[d.Species == "setosa"].assign(both=d.Species + "-" + d.Sepal_Length.astype(str)),
             "function(e) { e <- e[e$Species == 'setosa', ]; "
             "e$both <- paste(e$Species, format(e$Sepal_Length, nsmall = 1), sep = '-'); e }")
    rows = spark_apply(iris_df, f).collect()
    assert len(rows) == 50 and all(r.both.startswith("setosa-") for r in rows)
    assert {r.both for r in rows} >= {"setosa-5.1", "setosa-4.9"}


@pytest.mark.parametrize("lang", LANGS)
def test_repartitioned_input_and_empty_partitions(spark, lang):
    df = spark.range(5).repartition(10)
    f = pick(lang, lambda d: d.assign(id=d.id * 2), "function(e) { e$id <- e$id * 2; e }")
    assert sorted(r.id for r in spark_apply(df, f, schema="id long").collect()) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("lang", LANGS)
def test_error_handled_inside_the_closure(spark, lang):
    def py(d):
        try:
            raise ValueError("inner")
        except ValueError as e:
            return pd.DataFrame({"msg": [str(e)]})
    f = pick(lang, py, "function(e) tryCatch(stop('inner'), error = function(err) "
                       "data.frame(msg = conditionMessage(err)))")
    out = spark_apply(spark.range(3).repartition(1), f, schema="msg string")
    assert [r.msg for r in out.collect()] == ["inner"]


@pytest.mark.parametrize("lang", LANGS)
def test_na_columns_and_na_dates(spark, lang):
    df = spark.createDataFrame([(1, None, None), (2, None, dt.date(1969, 7, 20))],
                               "id int, s string, day date")
    f = pick(lang, lambda d: d.assign(none=None), "function(e) { e$none <- NA; e }")
    out = spark_apply(df, f, schema="id int, s string, day date, none string")
    assert sorted(tuple(r) for r in out.collect()) == [(1, None, None, None),
                                                        (2, None, dt.date(1969, 7, 20), None)]


@pytest.mark.parametrize("lang", LANGS)
def test_date_round_trip_and_arithmetic(spark, lang):
    days = [dt.date(1950, 5, 17), dt.date(1999, 12, 31), dt.date(2024, 2, 29)]
    df = spark.createDataFrame([(d,) for d in days], "day date")
    f = pick(lang, lambda d: d.assign(following=pd.to_datetime(d.day) + pd.Timedelta(days=1)),
             "function(e) { e$following <- e$day + 1; e }")
    out = spark_apply(df, f, schema="day date, following date")
    assert sorted((r.day, r.following) for r in out.collect()) == [(d, d + dt.timedelta(days=1)) for d in days]


@pytest.mark.parametrize("lang", LANGS)
def test_grouped_empty_results_are_dropped(spark, iris_df, lang):
    f = pick(lang, lambda d: d[d.Petal_Width > 1.7][["Petal_Width"]],
             "function(e) e[e$Petal_Width > 1.7, 'Petal_Width', drop = FALSE]")
    out = spark_apply(iris_df, f, group_by="Species", schema="Petal_Width double")
    species = {r.Species for r in out.collect()}
    assert species == {"versicolor", "virginica"}            # setosa's result was empty


@pytest.mark.parametrize("lang", LANGS)
def test_barrier(spark, lang):
    df = spark.range(10).repartition(2)
    f = pick(lang, lambda d, barrier: pd.DataFrame({"n": [len(barrier["address"])]}),
             "function(e, barrier) data.frame(n = length(barrier$address))")
    out = spark_apply(df, f, barrier=True, schema="n long")
    assert [r.n for r in out.collect()] == [2, 2]


@pytest.mark.parametrize("lang", LANGS)
def test_context_dataframe_for_both(spark, lang):
    lookup = pd.DataFrame({"k": [0, 1, 2], "label": ["zero", "one", "two"]})
    df = spark.range(6).repartition(2)
    f = pick(lang,
             lambda d, ctx: d.assign(label=ctx.set_index("k").label.reindex(d.id % 3).to_numpy()),
             "function(e, ctx) { e$label <- ctx$label[match(e$id %% 3, ctx$k)]; e }")
    out = spark_apply(df, f, context=lookup, schema="id long, label string")
    assert sorted(tuple(r) for r in out.collect()) == [(i, ["zero", "one", "two"][i % 3]) for i in range(6)]
