"""One suite, both children: the same cases against PyScript and RScript on local Spark."""

from __future__ import annotations

import datetime as dt
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from workerbridge import R, spark_apply, spark_log
from workerbridge.wire.errors import BadInputError

LANGS = ["python", "r"]

# (python closure, R code) for each behaviour
IDENTITY = (lambda d: d, "function(df) df")
FILTER_ADD = (lambda d: d[d.x > 2].assign(y=d.x * 10.0),
              "function(df) { df <- df[df$x > 2, , drop = FALSE]; df$y <- df$x * 10; df }")
VECTOR = (lambda d: d.x * 2, "function(df) df$x * 2")
SCALAR = (lambda d: len(d), "function(df) nrow(df)")
EMPTY = (lambda d: d.iloc[0:0], "function(df) df[0, , drop = FALSE]")
CONTEXT = (lambda d, ctx: d.assign(x=d.x + ctx["offset"], tag=ctx["tag"]),
           "function(df, ctx) { df$x <- df$x + ctx$offset; df$tag <- ctx$tag; df }")


def closure(pair, lang):
    return pair[0] if lang == "python" else R(pair[1])


def typed_rows():
    utc = dt.timezone.utc
    return [
        (1, 10, 1.5, "plain", True, dt.date(1969, 12, 31), dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=utc)),
        (2, -(2**53), float("nan"), "", False, dt.date(1900, 1, 1), dt.datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=utc)),
        (3, 2**53, float("inf"), "ünï€ode 日本", None, dt.date(2038, 1, 19), None),
        (None, None, float("-inf"), None, True, None, dt.datetime(1901, 1, 1, 0, 0, 0, 123456, tzinfo=utc)),
        (5, 0, None, "tab\tand\nnewline", False, dt.date(1970, 1, 1), dt.datetime(2000, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))),
    ]


TYPED_DDL = "i int, l long, d double, s string, b boolean, day date, ts timestamp"


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_rows_equal(got, want):
    key = lambda r: repr(r[0])  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(same(x, y) for x, y in zip(g, w)), (g, w)


@pytest.fixture(scope="module")
def typed(spark):
    return spark.createDataFrame(typed_rows(), TYPED_DDL).repartition(2)


@pytest.mark.parametrize("lang", ["python", "python-arrow", "r"])
def test_identity_every_type_nan_inf_empty_unicode_old_dates(spark, typed, lang):
    f = closure(IDENTITY, "r" if lang == "r" else "python")
    options = {"input": "arrow"} if lang == "python-arrow" else {}
    out = spark_apply(typed, f, schema=typed.schema, **options)
    want = [tuple(r) for r in typed.collect()]
    if lang == "python":
        # pandas holds no NaN apart from null in a float column: like mapInPandas,
        # a NaN comes back as null (input="arrow" and R keep them apart)
        want = [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in r)
                for r in want]
    assert_rows_equal([tuple(r) for r in out.collect()], want)


@pytest.mark.parametrize("lang", LANGS)
def test_identity_with_inferred_schema(spark, typed, lang):
    out = spark_apply(typed, closure(IDENTITY, lang))
    names = [f.name for f in out.schema]
    assert names == [f.name for f in typed.schema]
    got = out.collect()

    def plain(r):   # R gives longs back as doubles when it infers; pandas NaN -> null
        return tuple(float(v) if isinstance(v, int) and not isinstance(v, bool)
                     else None if lang == "python" and isinstance(v, float) and math.isnan(v)
                     else v for v in r)
    assert_rows_equal([plain(r) for r in got], [plain(r) for r in typed.collect()])


@pytest.fixture(scope="module")
def numbers(spark):
    return spark.createDataFrame(pd.DataFrame({"x": np.arange(10, dtype="float64")})).repartition(3)


@pytest.mark.parametrize("lang", LANGS)
def test_filter_and_add_columns(spark, numbers, lang):
    out = spark_apply(numbers, closure(FILTER_ADD, lang), schema="x double, y double")
    assert sorted(tuple(r) for r in out.collect()) == [(float(x), x * 10.0) for x in range(3, 10)]


@pytest.mark.parametrize("lang", LANGS)
def test_vector_result_becomes_result_column(spark, numbers, lang):
    out = spark_apply(numbers, closure(VECTOR, lang))
    assert out.columns == ["result"]
    assert sorted(r.result for r in out.collect()) == [x * 2.0 for x in range(10)]


@pytest.mark.parametrize("lang", LANGS)
def test_scalar_result_one_row_per_partition(spark, numbers, lang):
    out = spark_apply(numbers, closure(SCALAR, lang), schema="result long")
    values = [r.result for r in out.collect()]
    assert sum(values) == 10 and len(values) == 3


@pytest.mark.parametrize("lang", LANGS)
def test_empty_result(spark, numbers, lang):
    out = spark_apply(numbers, closure(EMPTY, lang), schema="x double")
    assert out.collect() == []


@pytest.mark.parametrize("lang", LANGS)
def test_zero_column_result(spark, numbers, lang):
    f = (lambda d: d[[]]) if lang == "python" else R("function(df) df[, 0, drop = FALSE]")
    frames = spark_apply(numbers, f, schema="x double", fetch_result_as_sdf=True)
    # zero columns cannot fill a column: a clear error, not invented values
    with pytest.raises(Exception, match="missing \\['x'\\]"):
        frames.collect()


@pytest.mark.parametrize("lang", LANGS)
def test_context(spark, numbers, lang):
    out = spark_apply(numbers, closure(CONTEXT, lang), context={"offset": 100, "tag": "ctx ü"},
                      schema="x double, tag string")
    assert sorted(tuple(r) for r in out.collect()) == [(100.0 + x, "ctx ü") for x in range(10)]


@pytest.mark.parametrize("lang", LANGS)
def test_log_lines_sum_to_rows(spark, numbers, lang):
    role = "PyScript" if lang == "python" else "RScript"
    before = len(spark_log(spark, n=None))
    assert spark_apply(numbers, closure(IDENTITY, lang), schema="x double").count() == 10
    lines = spark_log(spark, filter=f"{role} (", n=None)
    new = [ln for ln in spark_log(spark, n=None)[before:] if f" {role} (" in ln]
    got = [int(ln.split("retrieved ")[1].split()[0]) for ln in new
           if "retrieved" in ln and ln.endswith(" rows")]
    assert sum(got) == 10 and lines


def test_r_error_text_call_and_traceback_reach_the_driver(spark, numbers):
    code = """function(df) {
      helper <- function(v) stop("value too small: ", min(v))
      helper(df$x)
    }"""
    with pytest.raises(Exception) as info:
        spark_apply(numbers, R(code), schema="x double").collect()
    text = str(info.value)
    assert "RScript (R) failed in partition" in text
    assert "value too small: " in text
    assert "helper(df$x)" in text              # the call, and the R traceback
    assert "Hint:" in text


def test_r_syntax_error_is_caught_on_the_driver(spark, numbers):
    with pytest.raises(BadInputError, match="R syntax error") as info:
        spark_apply(numbers, R("function(df) { df$x <- df$x + ; df }"), schema="x double")
    assert "unexpected" in str(info.value)


def test_r_code_is_parsed_on_the_driver_once_per_code(spark, numbers, tmp_path):
    # an Rscript that notes each driver-side parse, then runs the real one
    calls = tmp_path / "parses"
    rscript = tmp_path / "Rscript"
    rscript.write_text("#!/bin/sh\n"
                       f"case \"$*\" in *readLines*) echo parse >> '{calls}';; esac\n"
                       f"exec '{shutil.which('Rscript')}' \"$@\"\n")
    rscript.chmod(0o755)
    parses = lambda: len(calls.read_text().splitlines()) if calls.exists() else 0  # noqa: E731
    code = "function(df) { df$x <- df$x + 1; df }   # parsed once"
    outs = [spark_apply(numbers, R(code), schema="x double", rscript=str(rscript)) for _ in range(3)]
    assert parses() == 1
    assert sorted(r.x for r in outs[2].collect()) == [x + 1.0 for x in range(10)]
    spark_apply(numbers, R(code + "\n"), schema="x double", rscript=str(rscript))
    assert parses() == 2                       # another code is parsed
    for _ in range(2):                         # a failure is not remembered
        with pytest.raises(BadInputError, match="R syntax error"):
            spark_apply(numbers, R("function(df) df +"), schema="x double", rscript=str(rscript))
    assert parses() == 4


def test_r_code_that_is_not_a_function(spark, numbers):
    with pytest.raises(Exception, match="function"):
        spark_apply(numbers, R("42"), schema="x double").collect()


def test_r_file_closure_and_warnings_to_log(spark, numbers, tmp_path):
    path = tmp_path / "model.R"
    path.write_text("scale <- 3\nfunction(df) { warning('careful ü'); worker_log('from R'); "
                    "df$x <- df$x * scale; df }\n")
    out = spark_apply(numbers, R(path=str(path)), schema="x double")
    assert sorted(r.x for r in out.collect()) == [3.0 * x for x in range(10)]
    assert spark_log(spark, filter="RClosure", n=None)
    assert any(" WARN " in ln and "careful ü" in ln for ln in spark_log(spark, filter="RClosure", n=None))
    assert any(ln.endswith("from R") for ln in spark_log(spark, filter="RClosure", n=None))


def test_r_int64_beyond_2_53(spark):
    big = 2**53 + 1
    df = spark.createDataFrame([(big,), (5,)], "l long")
    exact = spark_apply(df, R("function(df) { stopifnot(is.character(df$l)); df }"),
                        schema="l long", int64="character")
    assert sorted(r.l for r in exact.collect()) == [5, big]
    assert spark_apply(df, R("function(df) df"), schema="l double").count() == 2
    assert spark_log(spark, filter="2^53", n=None)
