"""The differential suite: generated schemas and data, spark_apply against Spark itself.

Covers, for both children: identity returns the input rows as a multiset;
``group_by`` on 1-3 generated key columns returns exactly Spark's
``groupBy().count()`` (keys exact, null and NaN keys apart); an inferred schema
equals the input's for an identity closure (Python).  Types: boolean, byte to
long with their limits, float/double with NaN, infinities, -0.0 and 2^53 + 1,
decimal up to 38 digits, strings (empty, non-ASCII, long, newlines), binary,
dates from year 1 to 9999, timestamp and timestamp_ntz in a non-UTC session
time zone across DST changes, nulls everywhere, and for Python arrays, structs
and maps; odd column names; 0 rows; 1 to 8 partitions, some empty.

Each child is held to what it promises (README, "What each type becomes"):
the pandas path gives NaN back as null; R is given values it holds exactly
(longs within 2^53, no int32 minimum, decimals of up to 15 digits, timestamps
between 1700 and 2250, no NUL in strings); the lossy edges are explicit tests
in ``test_correctness.py``, where every example this suite found is kept.

CI runs a fixed seed and a few examples per property (``derandomize``);
``WB_HYPOTHESIS_LONG=1`` runs a long random search (200 examples each, or
``WB_HYPOTHESIS_EXAMPLES``).
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F
from pyspark.sql import types as T

from workerbridge import R, spark_apply

LONG = os.environ.get("WB_HYPOTHESIS_LONG") == "1"
EXAMPLES = int(os.environ.get("WB_HYPOTHESIS_EXAMPLES", "200" if LONG else "4"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
                    print_blob=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])
ZONE = "America/New_York"
NAMES = ["a", "Sepal.Length", "a b", "back`tick", "ünï", "1st", "function", "TRUE", "NA", "x",
         "a.b.c", "NULL", "if"]
UTC = dt.timezone.utc
# around the DST changes of 2024 in New York (UTC instants), and anywhere
DST = [dt.datetime(2024, 3, 10, 6, 59, 59, 999999, tzinfo=UTC),
       dt.datetime(2024, 3, 10, 7, 0, tzinfo=UTC), dt.datetime(2024, 11, 3, 5, 30, tzinfo=UTC),
       dt.datetime(2024, 11, 3, 6, 30, 0, 1, tzinfo=UTC)]


def _floats(width):
    special = [math.nan, math.inf, -math.inf, -0.0, 0.0]
    if width == 64:
        special += [2.0**53 + 2, 2.0**53, 0.1 + 0.2, 0.3, 5e-324, 1.7976931348623157e308]
    return st.floats(width=width) | st.sampled_from(special)


def _decimals(draw, lang):
    precision = draw(st.integers(1, 15 if lang == "r" else 38))
    scale = draw(st.integers(0, precision))
    top = 10**precision - 1
    values = st.integers(-top, top) | st.sampled_from([top, -top, 0])
    return T.DecimalType(precision, scale), values.map(lambda u: decimal.Decimal(u).scaleb(-scale))


def _timestamps(lang, aware):
    lo, hi = (dt.datetime(1700, 1, 1), dt.datetime(2250, 1, 1)) if lang == "r" else \
        (dt.datetime(1, 1, 2), dt.datetime(9999, 12, 30))
    plain = st.datetimes(min_value=lo, max_value=hi)
    if aware:
        return plain.map(lambda d: d.replace(tzinfo=UTC)) | st.sampled_from(DST)
    return plain | st.sampled_from([d.replace(tzinfo=None) for d in DST])


def _text(lang):
    alphabet = st.characters(blacklist_categories=["Cs"],
                             blacklist_characters="\x00" if lang == "r" else "")
    return st.text(alphabet, max_size=20) | st.sampled_from(["", "line\nbreak", "日本語 ü€",
                                                            "x" * 5000])


@st.composite
def column_type(draw, lang, keys=False):
    """(Spark type, value strategy without nulls)."""
    kinds = ["boolean", "byte", "short", "int", "long", "float", "double", "decimal", "string",
             "binary", "date", "timestamp", "timestamp_ntz"]
    if lang == "python" and not keys:
        kinds += ["array", "struct", "map"]
    kind = draw(st.sampled_from(kinds))
    ints = {"byte": (T.ByteType(), 8), "short": (T.ShortType(), 16), "int": (T.IntegerType(), 32),
            "long": (T.LongType(), 64)}
    if kind in ints:
        typ, bits = ints[kind]
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if lang == "r" and bits == 32:
            lo += 1                                   # int32 min is R's NA
        if lang == "r" and bits == 64:
            lo, hi = -(2**53), 2**53                  # R holds longs as doubles
        return typ, st.integers(lo, hi) | st.sampled_from([lo, hi, 0])
    simple = {
        "boolean": (T.BooleanType(), st.booleans()),
        "float": (T.FloatType(), _floats(32)),
        "double": (T.DoubleType(), _floats(64)),
        "string": (T.StringType(), _text(lang)),
        "binary": (T.BinaryType(), st.binary(max_size=20).map(bytearray)),
        "date": (T.DateType(), st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31))
                 | st.sampled_from([dt.date(1, 1, 1), dt.date(1969, 12, 31), dt.date(9999, 12, 31)])),
        "timestamp": (T.TimestampType(), _timestamps(lang, aware=True)),
        "timestamp_ntz": (T.TimestampNTZType(), _timestamps(lang, aware=False)),
        "array": (T.ArrayType(T.LongType()), st.lists(st.none() | st.integers(-2**63, 2**63 - 1),
                                                      max_size=4)),
        "struct": (T.StructType([T.StructField("i", T.IntegerType()), T.StructField("s", T.StringType())]),
                   st.tuples(st.none() | st.integers(-2**31, 2**31 - 1), st.none() | _text(lang))),
        "map": (T.MapType(T.StringType(), T.DoubleType()),
                st.dictionaries(_text(lang), st.none() | st.floats(allow_nan=False), max_size=3)),
    }
    if kind == "decimal":
        return _decimals(draw, lang)
    return simple[kind]


@st.composite
def frames(draw, lang, keys=False):
    """(StructType, rows, partitions)."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique_by=str.lower))
    cols = [draw(column_type(lang, keys)) for _ in names]
    schema = T.StructType([T.StructField(n, t, True) for n, (t, _) in zip(names, cols)])
    row = st.tuples(*[st.none() | values for _, values in cols])
    rows = draw(st.lists(row, max_size=25))
    if keys and rows:                     # repeated keys: groups of more than one row
        rows = rows + draw(st.lists(st.sampled_from(rows), max_size=10))
    return schema, rows, draw(st.integers(1, 8))


def quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def norm(v):
    """A collected value as a hashable, exact key (NaN equal to NaN, -0.0 kept apart)."""
    if isinstance(v, float):
        return ("nan",) if math.isnan(v) else ("f", v, math.copysign(1.0, v))
    if isinstance(v, dict):
        return ("d", tuple(sorted((norm(k), norm(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return ("l", tuple(norm(x) for x in v))
    if isinstance(v, (bytes, bytearray)):
        return ("b", bytes(v))
    return ("v", type(v).__name__, v)


def multiset(rows) -> list:
    return sorted((tuple(norm(v) for v in r) for r in rows), key=repr)


def expected_identity(rows, lang):
    """The input rows as the child gives them back: pandas turns NaN into null."""
    if lang != "python":
        return rows
    return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in r) for r in rows]


@pytest.fixture(scope="module")
def zoned(spark):
    """The shared session in a non-UTC time zone for this module."""
    old = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", ZONE)
    yield spark
    spark.conf.set("spark.sql.session.timeZone", old)


def make_df(spark, schema, rows, partitions):
    return spark.createDataFrame(rows, schema).repartition(partitions)


IDENTITY = {"python": lambda d: d, "r": R("function(d) d")}
COUNT = {"python": lambda d: {"n": len(d)}, "r": R("function(d) data.frame(n = nrow(d))")}


def check_identity(spark, lang, schema, rows, partitions):
    df = make_df(spark, schema, rows, partitions)
    out = spark_apply(df, IDENTITY[lang], schema=schema)
    assert multiset(out.collect()) == multiset(expected_identity(df.collect(), lang))


def check_group_counts(spark, lang, schema, rows, partitions, nkeys):
    df = make_df(spark, schema, rows, partitions)
    keys = schema.names[:nkeys]
    out_schema = T.StructType([schema[k] for k in keys] + [T.StructField("n", T.LongType())])
    out = spark_apply(df, COUNT[lang], schema=out_schema, group_by=keys)
    got = [tuple(r) for r in out.collect()]
    want = [tuple(r) for r in df.groupBy(*[F.col(quoted(k)) for k in keys]).count().collect()]
    assert multiset(got) == multiset(want)


@pytest.mark.parametrize("lang", ["python", "r"])
def test_identity_returns_the_input_multiset(zoned, lang):
    @SETTINGS
    @given(frames(lang))
    def run(frame):
        check_identity(zoned, lang, *frame)
    run()


@pytest.mark.parametrize("lang", ["python", "r"])
def test_group_by_counts_equal_sparks_group_by(zoned, lang):
    @SETTINGS
    @given(frames(lang, keys=True), st.integers(1, 3))
    def run(frame, nkeys):
        schema, rows, partitions = frame
        check_group_counts(zoned, lang, schema, rows, partitions, min(nkeys, len(schema.names)))
    run()


def test_inferred_schema_of_identity_equals_the_input_schema(zoned):
    @SETTINGS
    @given(frames("python"))
    def run(frame):
        schema, rows, partitions = frame
        if not rows:
            return                                # nothing to infer from: a clear error instead
        df = make_df(zoned, schema, rows, partitions)
        out = spark_apply(df, lambda d: d, input="arrow")
        assert out.schema == T.StructType([T.StructField(f.name, f.dataType, True)
                                           for f in schema.fields])
    run()
