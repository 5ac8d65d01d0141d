"""Wrong answers found on ordinary data, each kept as a case that failed before its fix.

Covers: exact group keys in both children (long keys past 2^53, 0.1 + 0.2 vs 0.3,
NaN and null keys, separator-like strings), odd column names (dots, spaces,
backticks, R keywords, case), the partition index under schema inference, numeric
log ids for the schema sample, R results whose groups give a column different
classes, and joined input batches that Arrow splits.  Oracle: Spark itself
(``groupBy().count()``, the input rows).  The differential suite
(``test_differential.py``) generates more of these; every example it found is here.
"""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pytest

from workerbridge import R, spark_apply, spark_log
from workerbridge.wire.logline import parse_line

LANGS = ["python", "r"]
COUNT = {"python": lambda d: {"n": len(d)}, "r": "function(d) data.frame(n = nrow(d))"}
IDENTITY = {"python": lambda d: d, "r": "function(d) d"}


def fn(table, lang):
    return R(table[lang]) if lang == "r" else table[lang]


def norm(v):
    """A value as a comparable key: NaN equal to NaN, -0.0 to 0.0."""
    if isinstance(v, float):
        return ("nan",) if math.isnan(v) else ("f", v + 0.0)
    return ("v", repr(v))


def spark_counts(df, keys):
    return sorted((tuple(norm(r[k]) for k in keys), r["count"])
                  for r in df.groupBy(*keys).count().collect())


# ---- item 1 and 2: group keys are exact ---------------------------------------------------
def group_counts(df, keys, lang, **options):
    out = spark_apply(df, fn(COUNT, lang), group_by=keys,
                      schema=", ".join(f"`{k}` {df.schema[k].dataType.simpleString()}" for k in keys)
                      + ", n long", **options)
    return sorted((tuple(norm(r[k]) for k in keys), r["n"]) for r in out.collect())


@pytest.mark.parametrize("lang", LANGS)
def test_long_keys_exact_in_double_stay_apart(spark, lang):
    rows = [(1000000000000001,), (1000000000000002,), (2**53,), (-(2**53),), (None,), (2**53,)]
    df = spark.createDataFrame(rows, "k long").repartition(1)
    assert group_counts(df, ["k"], lang) == spark_counts(df, ["k"])


@pytest.mark.parametrize("lang", LANGS)
def test_long_keys_past_2_53_stay_apart(spark, lang):
    # R holds a long as a double unless int64="character"; Python always exactly
    rows = [(2**53,), (2**53 + 1,), (None,), (2**53,), (-(2**63),), (2**63 - 1,)]
    df = spark.createDataFrame(rows, "k long").repartition(1)
    options = {"int64": "character"} if lang == "r" else {}
    assert group_counts(df, ["k"], lang, **options) == spark_counts(df, ["k"])


def test_r_long_keys_past_2_53_as_double_warn_naming_the_column(spark):
    df = spark.createDataFrame([(2**53 + 1, 1.0), (2**53 + 3, 2.0)], "big_key long, v double")
    before = len(spark_log(spark, n=None))
    spark_apply(df, R("function(d) d"), schema="big_key double, v double").collect()
    warns = [ln for ln in spark_log(spark, n=None)[before:] if " WARN " in ln]
    assert any("'big_key'" in ln and "2^53" in ln for ln in warns), warns


@pytest.mark.parametrize("lang", LANGS)
def test_double_keys_exact_nan_and_null_apart(spark, lang):
    rows = [(0.1 + 0.2,), (0.3,), (float("nan"),), (None,), (float("nan"),), (1e300,),
            (float("inf"),), (float("-inf"),), (-0.0,), (0.0,), (0.3,)]
    df = spark.createDataFrame(rows, "k double").repartition(1)
    assert group_counts(df, ["k"], lang) == spark_counts(df, ["k"])


@pytest.mark.parametrize("lang", LANGS)
def test_string_keys_like_separators_and_markers(spark, lang):
    rows = [("a\x02b", "c"), ("a", "b\x02c"), ("\x01NA", "x"), (None, "x"), ("NA", "x"),
            ("", ""), ("", None), (None, "")]
    df = spark.createDataFrame(rows, "k1 string, k2 string").repartition(1)
    assert group_counts(df, ["k1", "k2"], lang) == spark_counts(df, ["k1", "k2"])


@pytest.mark.parametrize("lang", LANGS)
def test_mixed_key_types_and_int_min(spark, lang):
    low = -(2**31) + (lang == "r")              # R holds int32 min as NA (a WARN; see below)
    rows = [(low, True, "2020-01-01"), (None, True, "2020-01-01"), (low, None, None),
            (2**31 - 1, False, "0001-01-01"), (low, True, "2020-01-01")]
    df = spark.createDataFrame(rows, "i int, b boolean, s string").selectExpr(
        "i", "b", "cast(s as date) as d").repartition(1)
    assert group_counts(df, ["i", "b", "d"], lang) == spark_counts(df, ["i", "b", "d"])


# ---- item 3: odd column names -------------------------------------------------------------
ODD = ["Sepal.Length", "a b", "back`tick", "ünï", "1st", "function", "TRUE", "NA", "x", "X",
       "a.b.c"]


@pytest.mark.parametrize("lang", LANGS)
def test_odd_column_names_survive_identity_and_group_by(spark, lang):
    from pyspark.sql import functions as F
    df = spark.range(6, numPartitions=2).select(
        *[(F.col("id") + i).alias(name) for i, name in enumerate(ODD)])
    want = sorted(tuple(r) for r in df.collect())
    ident = spark_apply(df, fn(IDENTITY, lang), schema=df.schema)
    assert ident.columns == ODD and sorted(tuple(r) for r in ident.collect()) == want
    inferred = spark_apply(df, fn(IDENTITY, lang))
    assert inferred.columns == ODD
    assert sorted(tuple(int(v) for v in r) for r in inferred.collect()) == want
    grouped = spark_apply(df, fn(IDENTITY, lang), group_by=["Sepal.Length", "back`tick"],
                          schema=df.schema)
    at = [grouped.columns.index(c) for c in ODD]          # group columns come first
    assert sorted(tuple(r[i] for i in at) for r in grouped.collect()) == want


# ---- item 4: the partition index is an integer, also when the schema is inferred -----------
@pytest.mark.parametrize("lang", LANGS)
def test_partition_index_param_is_an_integer_under_inference(spark, lang):
    from pyspark.sql.types import LongType, IntegerType
    df = spark.range(8, numPartitions=4)
    f = (lambda d, index: d.assign(p=index)) if lang == "python" else \
        R("function(d, index) { d$p <- index; d }")
    out = spark_apply(df, f, partition_index_param="index")
    assert isinstance(out.schema["p"].dataType, (LongType, IntegerType)) or lang == "r"
    ps = sorted({r.p for r in out.collect()})
    assert ps == [0, 1, 2, 3] and all(not isinstance(p, str) for p in ps)


# ---- item 5: every log line's id is a number, and the sample says what it is --------------
def test_schema_sample_lines_have_numeric_ids(spark):
    before = len(spark_log(spark, n=None))
    spark_apply(spark.range(4), lambda d: d).collect()
    lines = spark_log(spark, n=None)[before:]
    assert lines
    for ln in lines:
        assert re.search(r"\((\d+)\)", ln), ln
        assert parse_line(ln)["id"].isdigit(), ln
    assert any("schema sample" in ln for ln in lines)


# ---- item 6: R results whose groups give a column different classes -----------------------
def test_r_rbind_of_groups_with_different_classes(spark):
    df = spark.createDataFrame([(1,), (2,), (3,)], "g long").repartition(1)
    code = """function(d) {
      if (d$g == 1) data.frame(f = factor("lvl"), day = NA, s = NA_character_)
      else if (d$g == 2) data.frame(f = "chr", day = as.Date("2024-03-01"), s = "x")
      else data.frame(f = factor("b", levels = c("a", "b")), day = as.Date(NA), s = factor("y"))
    }"""
    out = spark_apply(df, R(code), group_by="g", schema="g long, f string, day date, s string")
    got = {r.g: (r.f, None if r.day is None else str(r.day), r.s) for r in out.collect()}
    assert got == {1: ("lvl", None, None), 2: ("chr", "2024-03-01", "x"), 3: ("b", None, "y")}


def test_r_rbind_refuses_incompatible_classes(spark):
    df = spark.createDataFrame([(1,), (2,)], "g long").repartition(1)
    code = """function(d) if (d$g == 1) data.frame(v = as.Date("2024-01-01")) else data.frame(v = "x")"""
    with pytest.raises(Exception, match=r"(?s)column 'v'.*different classes \((character, Date|Date, character)\)"):
        spark_apply(df, R(code), group_by="g", schema="g long, v string").collect()


# ---- item 7: joined input batches that Arrow splits are all sent ---------------------------
def test_joined_batches_keep_every_row():
    from workerbridge.task.worker import joined_batches
    # one 1.1 GiB buffer shared by two batches (zero copy): joined, the strings
    # pass the 32-bit offsets and Arrow returns two chunks
    size = 1_100_000_000
    data = pa.allocate_buffer(size)          # not touched: no memory until joined
    offsets = pa.array([0, size // 2, size], pa.int32()).buffers()[1]
    col = pa.Array.from_buffers(pa.string(), 2, [None, offsets, data])
    batch = pa.RecordBatch.from_arrays([col], names=["s"])
    out = list(joined_batches([batch, batch]))
    assert sum(b.num_rows for b in out) == 4
    assert len(out) >= 2


# ---- lossy conversions into R say so, naming the column ------------------------------------
def test_r_lossy_conversions_warn_naming_the_column(spark):
    df = spark.sql("select cast(-2147483648 as int) as int_min_col, "
                   "cast('12345678901234567890.5' as decimal(38, 1)) as wide_dec, "
                   "cast('1.25' as decimal(10, 2)) as narrow_dec")
    before = len(spark_log(spark, n=None))
    code = "function(d) { d$computed <- d$int_min_col + 0L; d }"
    got = spark_apply(df, R(code), schema="int_min_col int, wide_dec double, "
                                          "narrow_dec decimal(10, 2), computed int").collect()
    warns = [ln for ln in spark_log(spark, n=None)[before:] if " WARN " in ln]
    # R holds the minimum as NA, the same bits: returned as read or computed
    # from (NA + 0L), it is null (so a column holding it is never named and
    # put back: workerbridge/task/passthrough.py)
    assert got[0].computed is None and got[0].int_min_col is None
    assert str(got[0].narrow_dec) == "1.25"
    assert any("'int_min_col'" in ln and "-2147483648" in ln for ln in warns), warns
    assert any("'wide_dec'" in ln and "significant digits" in ln for ln in warns), warns
    assert not any("narrow_dec" in ln for ln in warns), warns


# ---- Python: nested types, wide decimals and all-null columns survive pandas ---------------
def test_python_identity_keeps_maps_structs_decimals_and_null_columns(spark):
    import decimal
    ddl = ("m map<string, double>, st struct<i: int, s: string>, arr array<bigint>, "
           "dec decimal(38, 10), nul int")
    rows = [({"a": 1.5, "b": None}, (1, "x"), [2**63 - 1, None], decimal.Decimal("1234567890123.0000000001"), None),
            (None, None, None, None, None)]
    df = spark.createDataFrame(rows, ddl).repartition(1)
    given_schema = spark_apply(df, lambda d: d, schema=df.schema).collect()
    assert sorted(map(repr, given_schema)) == sorted(map(repr, df.collect()))
    inferred = spark_apply(df, lambda d: d)
    assert inferred.schema.simpleString() == df.schema.simpleString()


@pytest.mark.parametrize("distinct", [True, False], ids=["distinct", "repeated"])
def test_large_string_partitions_reach_pandas_unchanged(spark, distinct):
    """Past the de-duplication sample (pandas shares str objects only when a
    column repeats) every value still arrives and returns exactly: Spark's own
    rows are the oracle."""
    from pyspark.sql import functions as F
    n = 20_000
    s = F.concat(F.lit("v"), (F.col("id") if distinct else F.col("id") % 7).cast("string"))
    df = spark.range(n, numPartitions=2).select("id", s.alias("s"),
                                                F.when(F.col("id") % 5 == 0, None).otherwise(s).alias("t"))
    got = spark_apply(df, lambda d: d.assign(u=d.s + "|" + d.t.fillna("-")),
                      schema="id long, s string, t string, u string")
    want = df.select("*", F.concat_ws("|", "s", F.coalesce("t", F.lit("-"))).alias("u"))
    assert got.exceptAll(want).count() == 0 and want.exceptAll(got).count() == 0
    assert got.count() == n
