"""The live progress line, fed by the Gateway lines of real spark_apply runs."""

from __future__ import annotations

import io
import time

import pandas as pd
import pytest

from workerbridge import spark_apply
from workerbridge.diagnostics import progress
from workerbridge.driver.session import session_gateway as _gateway
from workerbridge.wire.errors import BadInputError
from workerbridge.driver.gateway import Gateway


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\r", 1)[-1]


@pytest.fixture(scope="module")
def lines(spark):
    """The lines of a 3-partition spark_apply over 90 rows."""
    df = spark.createDataFrame(pd.DataFrame({"x": range(90)})).repartition(3)
    since = time.time()
    assert spark_apply(df, lambda d: d[d.x % 3 != 0], schema="x long").count() == 60
    return [ln for t, ln in _gateway(spark).events() if t >= since]


def test_replayed_lines_with_a_known_total(lines):
    out = FakeTTY()
    p = progress.Progress(out, total=3, backend="plain")
    for ln in lines:
        p.feed(ln)
    text = out.getvalue()
    assert text.endswith("\n") and p.finished_runs == 1
    final = last_line(text)
    assert "3/3 partitions" in final and "[" + "#" * 30 + "]" in final
    assert "rows 90 in, 60 out" in final and "0 failed" in final
    assert "\n" not in text[:-1]                 # one line, rewritten in place


def test_unknown_total_ends_when_quiet(lines):
    out = FakeTTY()
    p = progress.Progress(out, backend="plain", linger=0.3)
    for ln in lines:
        p.feed(ln)
    end = time.monotonic() + 5
    while p.finished_runs == 0 and time.monotonic() < end:
        time.sleep(0.05)
    final = last_line(out.getvalue())
    assert out.getvalue().endswith("\n") and "3 partitions done, 0 running" in final
    assert "rows 90 in, 60 out" in final


def test_live_on_a_session_gateway(spark):
    """spark_apply(progress=True) drives the display on the session's Gateway; Spark's
    status tracker gives the total."""
    df = spark.createDataFrame(pd.DataFrame({"x": range(30)})).repartition(3)
    out = FakeTTY()
    gw = _gateway(spark)
    display = progress.attach(gw, spark, progress=True, stream=out)
    try:
        assert spark_apply(df, lambda d: d, schema="x long", progress=True).count() == 30
        end = time.monotonic() + 10
        while not out.getvalue().endswith("\n") and time.monotonic() < end:
            time.sleep(0.05)
        final = last_line(out.getvalue())
        assert "3/3 partitions" in final and "rows 30 in, 30 out" in final, out.getvalue()
    finally:
        progress.attach(gw, spark, progress=False)
    assert not display.enabled


def test_off_unless_a_terminal_or_asked():
    gw = Gateway(log_path=None)
    try:
        assert progress.attach(gw, None, progress=None, stream=io.StringIO()) is None
        assert progress.attach(gw, None, progress=False, stream=FakeTTY()) is None
        assert progress.attach(gw, None, progress=None, stream=FakeTTY()) is not None
    finally:
        gw.stop()
    assert progress.wanted(False) is False and progress.wanted(True) is True


def test_bad_progress_value_is_refused_before_any_job(spark):
    df = spark.range(3)
    with pytest.raises(BadInputError, match="progress= takes"):
        spark_apply(df, lambda d: d, schema="id long", progress="loud")


def test_yes_and_no_parse_alike_for_every_flag(spark):
    """One yes/no parser: the conf value that works for reuse works for progress."""
    df = spark.range(3)
    spark.conf.set("spark.workerbridge.progress", "no")
    try:
        assert spark_apply(df, lambda d: d, schema="id long").count() == 3
        spark.conf.set("spark.workerbridge.progress", "maybe")
        with pytest.raises(BadInputError, match="progress= takes True or False"):
            spark_apply(df, lambda d: d, schema="id long")
    finally:
        spark.conf.unset("spark.workerbridge.progress")
