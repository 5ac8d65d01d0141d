"""Warm child reuse: children kept between tasks, never after an error, gone when idle."""

from __future__ import annotations

import re
import time

import pytest

from workerbridge import R, spark_apply, spark_log
from wbtest import child_processes

LANGS = {"python": lambda: (lambda d: d), "r": lambda: R("function(d) d")}


def _new_lines(spark, before: int) -> list:
    return spark_log(spark, n=None)[before:]


@pytest.mark.parametrize("lang", sorted(LANGS))
def test_warm_children_are_reused_and_reaped(spark, lang):
    df = spark.range(4000).repartition(8)
    before = len(spark_log(spark, n=None))
    out = spark_apply(df, LANGS[lang](), schema="id long", reuse=True, idle_timeout=2)
    assert sorted(r.id for r in out.collect()) == list(range(4000))
    lines = _new_lines(spark, before)
    started = [ln for ln in lines if re.search(r"started (Py|R)Script", ln)]
    reused = [ln for ln in lines if re.search(r"reused (Py|R)Script", ln)]
    assert len(started) + len(reused) == 8
    assert len(started) <= 2 and len(reused) >= 6      # local[2]: one child per Python worker
    # the same rows through warm children, again
    assert out.count() == 4000
    # idle children end after idle_timeout
    end = time.monotonic() + 15
    while child_processes() and time.monotonic() < end:
        time.sleep(0.2)
    assert not child_processes()


def test_closure_sent_once_per_warm_child(spark):
    df = spark.range(100).repartition(6)
    before = len(spark_log(spark, n=None))
    out = spark_apply(df, lambda d: d.assign(k=1), schema="id long, k int", reuse=True,
                      idle_timeout=3)
    assert out.count() == 100 and out.count() == 100
    lines = _new_lines(spark, before)
    loads = [ln for ln in lines if "loaded closure" in ln]
    runs = [ln for ln in lines if "applied closure to" in ln]
    assert len(runs) == 12 and 1 <= len(loads) <= 2        # once per warm child
    before = len(spark_log(spark, n=None))
    out2 = spark_apply(df, lambda d: d.assign(k=2), schema="id long, k int", reuse=True,
                       idle_timeout=1)
    assert {r.k for r in out2.collect()} == {2}              # a new closure replaces the old
    assert [ln for ln in _new_lines(spark, before) if "loaded closure" in ln]


@pytest.mark.parametrize("lang", sorted(LANGS))
def test_never_reused_after_an_error(spark, lang):
    df = spark.range(10).repartition(1)
    bad = (lambda d: 1 / 0) if lang == "python" else R("function(d) stop('nope')")
    with pytest.raises(Exception):
        spark_apply(df, bad, schema="id long", reuse=True, idle_timeout=1).collect()
    before = len(spark_log(spark, n=None))
    good = LANGS[lang]()
    assert spark_apply(df, good, schema="id long", reuse=True, idle_timeout=1).count() == 10
    lines = _new_lines(spark, before)
    assert any(re.search(r"started (Py|R)Script", ln) for ln in lines)
    assert not any("reused" in ln for ln in lines)


def test_python_and_r_jobs_alternating_keep_their_warm_children(spark):
    # Both languages ship the same runtime, so an executor does not reload
    # workerbridge (and lose its pool) each time the language changes.
    df = spark.range(1000).repartition(2)
    jobs = [LANGS["python"](), LANGS["r"]()] * 3
    before = len(spark_log(spark, n=None))
    for f in jobs:
        assert spark_apply(df, f, schema="id long", reuse=True, idle_timeout=5).count() == 1000
    lines = _new_lines(spark, before)
    for role in ("PyScript", "RScript"):
        started = [ln for ln in lines if f"started {role}" in ln]
        reused = [ln for ln in lines if f"reused {role}" in ln]
        assert len(started) <= 2 and len(reused) >= 4, (role, len(started), len(reused))


def test_a_warm_r_child_reads_each_tasks_own_schema():
    """One warm R child, task after task, streams whose schemas differ only in
    a column's type (the R reader keeps the last schema it parsed, by its
    bytes): each task's rows come back as they went in."""
    import pyarrow as pa

    from wbtest import ROOT, RUNTIME
    from workerbridge.driver.closure import pack
    from workerbridge.driver.gateway import Gateway
    from workerbridge.task.pool import POOL
    from workerbridge.task.spec import TaskSpec, WorkerOptions
    from workerbridge.task.worker import Worker

    tables = [pa.table({"a": pa.array([1, 2, 3], pa.int64())}),
              pa.table({"a": pa.array([1, 2, 3], pa.int64())}),
              pa.table({"a": pa.array([0.5, 1.5, -2.0], pa.float64())}),
              pa.table({"a": pa.array(["x", None, "ü"], pa.string())}),
              pa.table({"a": pa.array([7, None, 9], pa.int32())}),
              pa.table({"a": pa.array([1, 2, 3], pa.int64()), "b": pa.array([True, False, None])}),
              pa.table({"a": pa.array([4, 5, 6], pa.int64())})]
    gw = Gateway(log_path=None)
    pids = set()
    try:
        spec = TaskSpec(pack(R("function(d) d"), None, {}), RUNTIME.digest, None, gw.address,
                        WorkerOptions(reuse=True))
        for i, t in enumerate(tables):
            w = Worker(spec, 0, f"schema-{i}", root=ROOT)
            got = pa.Table.from_batches(list(w.run(iter(t.to_batches()))))
            pids.add(w.child.pid)
            assert got.column_names == t.column_names, i
            for name in t.column_names:
                want = t.column(name).to_pylist()
                assert got.column(name).to_pylist() == want, (i, name)
    finally:
        POOL.close_all()
        gw.stop()
    assert len(pids) == 1          # the same child read every schema
