"""The bad-input catalogue: each mistake is a clear BadInputError on the driver,
before any job runs.  The README's troubleshooting table lists the same cases."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from workerbridge import R, spark_apply
from workerbridge.wire.errors import BadInputError

ok = lambda d: d  # noqa: E731
_lock = threading.Lock()

# id: (call(df), words the message must contain)
CATALOGUE = {
    "df-is-pandas": (lambda df: spark_apply(pd.DataFrame({"id": [1]}), ok),
                     "spark.createDataFrame(pdf)"),
    "df-is-list": (lambda df: spark_apply([1, 2], ok), "pyspark DataFrame"),
    "df-duplicate-columns": (lambda df: spark_apply(df.select("id", "id"), ok), "duplicate column names"),
    "f-not-callable": (lambda df: spark_apply(df, 42), "callable"),
    "f-is-r-string": (lambda df: spark_apply(df, "function(df) df"), "wrap R code"),
    "f-unpicklable-capture": (lambda df: spark_apply(df, lambda d: d if _lock else d), "global '_lock'"),
    "R-no-code": (lambda df: R(), "exactly one"),
    "R-both-code-and-path": (lambda df: R("function(d) d", path="x.R"), "exactly one"),
    "R-missing-file": (lambda df: R(path="/nonexistent/model.R"), "no such file"),
    "R-empty": (lambda df: R("   "), "empty"),
    "R-nul-byte": (lambda df: R("function(d) '\0'"), "NUL"),
    "R-not-text": (lambda df: R(b"function(d) d"), "string of R code"),
    "R-syntax-error": (lambda df: spark_apply(df, R("function(d) { d$x <- ; d }")), "R syntax error"),
    "R-not-a-function": (lambda df: spark_apply(df, R("42")), "not a function"),
    "R-rscript-missing": (lambda df: spark_apply(df, R("function(d) d"), rscript="/no/Rscript"),
                          "Rscript not found"),
    "R-context-not-json": (lambda df: spark_apply(df, R("function(d, c) d"), context=object()),
                           "cannot be sent to an R closure"),
    "R-context-too-large": (lambda df: spark_apply(df, R("function(d, c) d"),
                                                   context="x" * (65 << 20)), "at most 64 MB"),
    "R-packages-not-names": (lambda df: spark_apply(df, R("function(d) d"), packages=[1]),
                             "package names"),
    "schema-bad-ddl": (lambda df: spark_apply(df, ok, schema="id lonk"), "does not parse"),
    "schema-empty": (lambda df: spark_apply(df, ok, schema=" "), "empty string"),
    "schema-wrong-type": (lambda df: spark_apply(df, ok, schema=3), "DDL string"),
    "schema-duplicate": (lambda df: spark_apply(df, ok, schema="a long, a long"), "more than once"),
    "option-unknown": (lambda df: spark_apply(df, ok, colums="x"), "unknown option"),
    "timeout-negative": (lambda df: spark_apply(df, ok, timeout=-1), "positive number"),
    "connect-timeout-text": (lambda df: spark_apply(df, ok, connect_timeout="soon"), "positive number"),
    "memory-limit-bad": (lambda df: spark_apply(df, ok, memory_limit="lots"), "not a size"),
    "sample-rows-zero": (lambda df: spark_apply(df, ok, sample_rows=0), "sample_rows"),
    "input-unknown": (lambda df: spark_apply(df, ok, input="polars"), "input="),
    "int64-unknown": (lambda df: spark_apply(df, ok, int64="bigint"), "int64="),
    "env-not-dict": (lambda df: spark_apply(df, ok, env=["A=1"]), "env="),
    "group-by-missing": (lambda df: spark_apply(df, ok, group_by="nope"), "lacks"),
    "group-by-twice": (lambda df: spark_apply(df, ok, group_by=["id", "id"]), "twice"),
    "group-by-type": (lambda df: spark_apply(df, ok, group_by=3), "column name"),
    "fetch-not-bool": (lambda df: spark_apply(df, ok, fetch_result_as_sdf="no"), "True or False"),
    "reuse-not-bool": (lambda df: spark_apply(df, ok, reuse="maybe"), "True or False"),
    "index-param-name": (lambda df: spark_apply(df, ok, partition_index_param="not valid"),
                         "parameter name"),
    "barrier-with-groups": (lambda df: spark_apply(df, ok, barrier=True, group_by="id"),
                            "cannot be combined"),
    "batch-mode-unknown": (lambda df: spark_apply(df, ok, batch_mode="rows"), "batch_mode="),
    "batch-mode-with-groups": (lambda df: spark_apply(df, ok, batch_mode="batch", group_by="id"),
                               "a group is always given whole"),
    "name-not-text": (lambda df: spark_apply(df, ok, name=5), "name="),
    "fetch-reserved-column": (lambda df: spark_apply(df, ok, schema="id long, __wb_unit long",
                                                     fetch_result_as_sdf=False), "reserved"),
    "infer-from-empty-input": (lambda df: spark_apply(df.limit(0), ok), "no rows to sample"),
    "infer-closure-returns-nothing": (lambda df: spark_apply(df, lambda d: None), "returned nothing"),
}


def test_catalogue_has_at_least_30_cases():
    assert len(CATALOGUE) >= 30


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_is_a_clear_error_before_any_job(spark, case):
    call, words = CATALOGUE[case]
    df = spark.range(3)
    jobs_before = spark.sparkContext.statusTracker().getJobIdsForGroup()
    with pytest.raises(BadInputError) as info:
        call(df)
    assert words in str(info.value)
    if not case.startswith("infer"):         # inference samples the input: one small job
        assert spark.sparkContext.statusTracker().getJobIdsForGroup() == jobs_before


def test_nul_bytes_sent_to_r_name_the_column(spark):
    """Data, not arguments: only a task can see it, and it names the column."""
    df = spark.createDataFrame(pd.DataFrame({"s": ["fine", "bad\0byte"]}))
    with pytest.raises(Exception) as info:
        spark_apply(df, R("function(d) d"), schema="s string").collect()
    text = str(info.value)
    assert "RScript" in text and "'s'" in text and "NUL" in text
