"""profile=True on a real Spark job, both children: every task sends one
profile line (phases and top functions, cProfile / Rprof), workerbridge.profile
sums them, the timeline cuts decode and encode out of the task's bars, and a
job without profile= sends none."""

from __future__ import annotations

import time

import workerbridge
from workerbridge import R, spark_apply
from workerbridge.diagnostics.tasks import tasks_from_events
from workerbridge.diagnostics.timeline import render_html
from workerbridge.driver.session import existing_gateway
from workerbridge.wire.phases import PHASES, parse_profile


def session_events(spark):
    return existing_gateway(spark).events()


def profile_lines(spark, since: float) -> list:
    out = []
    for t, line in session_events(spark):
        msg = line.split(") ", 1)[-1]
        if t >= since and parse_profile(msg) is not None:
            out.append((line, parse_profile(msg)))
    return out


def test_profile_both_languages(spark):
    df = spark.range(0, 60_000, numPartitions=2).selectExpr(
        "id", "cast(id % 100 as string) as k", "id * 0.5 as x")
    df = df.cache()
    df.count()
    since = time.time()
    jobs = {"cProfile": spark_apply(df, lambda d: d.assign(x=d.x * 2), schema=df.schema,
                                    profile=True),
            "Rprof": spark_apply(df, R("function(d) { d$x <- d$x * 2; d }"), schema=df.schema,
                                 profile=True)}
    for out in jobs.values():
        assert out.count() == 60_000
    lines = profile_lines(spark, since)
    by_profiler = {}
    for line, rec in lines:
        by_profiler.setdefault(rec["profiler"], []).append((line, rec))
    assert sorted(by_profiler) == ["Rprof", "cProfile"]
    for prof, recs in by_profiler.items():
        assert len(recs) == 2, (prof, recs)                     # one line per task
        for line, rec in recs:
            assert ("RScript" if prof == "Rprof" else "PyScript") in line
            assert set(rec["phases"]) == set(PHASES)
            assert rec["phases"]["decode"] > 0 and rec["phases"]["transfer"] >= 0
            assert all(v >= 0 for v in rec["phases"].values())
        assert any(rec["functions"] for _, rec in recs), prof   # sampled / traced functions
    summary = workerbridge.profile(spark, since=since, show=False)
    assert summary.tasks == 4
    assert {f[0] for f in summary.functions} == {"Rprof", "cProfile"}
    assert summary.phases["decode"] == sum(r["phases"]["decode"] for _, r in lines)
    text = str(summary)
    for name in ("spawn", "transfer", "decode", "closure", "encode", "send", "other"):
        assert f"\n{name} " in text
    # the timeline shows decode and encode as phases of the profiled tasks
    tasks = [t for t in tasks_from_events(session_events(spark))
             if t.start >= since and t.profile is not None]
    assert len(tasks) == 4
    r_task = next(t for t in tasks if t.language == "R")
    assert [n for n, _, _ in r_task.phases()] == ["spawn", "receive", "decode", "apply", "encode",
                                                  "send"]
    assert 'class="decode"' in render_html(tasks)
    # without profile=: no profile line
    since = time.time()
    assert spark_apply(df, R("function(d) d"), schema=df.schema).count() == 60_000
    assert profile_lines(spark, since) == []
    assert workerbridge.profile(spark, since=since, show=False).tasks == 0
