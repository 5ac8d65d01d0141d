"""batch_mode="batch" in the R child: the closure once per incoming Arrow record
batch, each result streamed back while the input still arrives, log lines held
until the output stream has ended, an error after the first result batch sent
as ERROR once the stream is closed; and a memory bound (both children) checked
by the Worker's own memory_limit over a 5M-row partition fed as 1000-row batches.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
import psutil
import pyarrow as pa
import pytest

from workerbridge import R, spark_apply, spark_log
from workerbridge.wire import protocol
from workerbridge.driver.closure import pack
from workerbridge.wire.errors import LimitError
from workerbridge.driver.gateway import Gateway
from workerbridge.task.pool import POOL
from wbtest import ROOT, RUNTIME
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker

from test_r_codec import RSCRIPT, ChildServer

pytestmark = pytest.mark.skipif(not os.path.exists(RSCRIPT), reason="Rscript not installed")


# ---------------------------------------------------------------------------
# The child over a real socket: frames in order, batch by batch

def run_batches(peer, closure: str, batches: list, options=None, context=None, **extra) -> list:
    """One task whose input is `batches`, sent by a thread while the frames are
    read (the child answers while the input still arrives).  Returns the frames
    as (name, value): OUTPUT -> the list of result batches."""
    task = {"partition": 3, "task_id": "t3", "context": context,
            "options": dict({"batch_mode": "batch"}, **(options or {})), **extra}
    peer.send_json(protocol.TASK, task)
    peer.send(protocol.CLOSURE, closure.encode("utf-8"))
    peer.send(protocol.INPUT)

    def send():
        sink = peer.conn.makefile("wb")
        with pa.ipc.new_stream(sink, batches[0].schema) as w:
            for b in batches:
                w.write_batch(b)
        sink.flush()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    frames = []
    while True:
        name, payload = peer.recv()
        if name == "OUTPUT":
            frames.append((name, list(pa.ipc.open_stream(peer.rfile))))
        else:
            frames.append((name, json.loads(payload)))
        if name in ("DONE", "ERROR"):
            break
    sender.join(30)
    return frames


def logs_of(frames) -> list:
    return [(v["role"], v["message"]) for n, v in frames if n == "LOG"]


def input_batches(n: int = 4, rows: int = 5) -> list:
    return [pa.record_batch({"x": pa.array(range(i * rows, (i + 1) * rows), pa.int64()),
                             "s": [f"r{i}-{j}" for j in range(rows)]}) for i in range(n)]


@pytest.fixture(scope="module")
def peer():
    cs = ChildServer()
    p, _ = cs.handshake()
    yield p
    p.send(protocol.BYE)
    rc, _, err = cs.finish()
    assert rc == 0, err


def test_closure_per_batch_results_streamed_logs_after_the_stream(peer):
    closure = r'''function(df, ctx) {
      worker_log("call ", nrow(df), " from ", df$x[1])
      if (df$x[1] == 5) warning("careful")
      data.frame(x = df$x * ctx$k, s = toupper(df$s), n = nrow(df), stringsAsFactors = FALSE)
    }'''
    frames = run_batches(peer, closure, input_batches(), context={"k": 2})
    names = [n for n, _ in frames]
    # one OUTPUT stream with one result batch per input batch; all LOG frames after it
    assert names[0] == "OUTPUT" and names[-1] == "DONE" and set(names[1:-1]) == {"LOG"}
    out = frames[0][1]
    assert [b.num_rows for b in out] == [5, 5, 5, 5]
    table = pa.Table.from_batches(out)
    assert table.column("x").to_pylist() == [2.0 * i for i in range(20)]
    assert table.column("s").to_pylist()[5] == "R1-0"
    assert logs_of(frames) == [
        ("RClosure", "call 5 from 0"), ("RClosure", "call 5 from 5"), ("RClosure", "careful"),
        ("RClosure", "call 5 from 10"), ("RClosure", "call 5 from 15"),
        ("RScript", "retrieved 20 rows"), ("RScript", "retrieved 2 column names"),
        ("RScript", "applied closure to 20 rows in 4 batches"), ("RScript", "returned 20 rows"),
        ("RScript", "finished")]
    assert [v["level"] for n, v in frames if n == "LOG"][2] == "WARN"
    assert frames[-1][1] == {"rows_in": 20, "rows_out": 20}


def test_error_in_a_late_batch_ends_the_stream_then_error(peer):
    closure = r'''function(df) {
      worker_log("saw ", df$x[1])
      if (max(df$x) > 12) stop("late failure at ", max(df$x))
      df
    }'''
    frames = run_batches(peer, closure, input_batches())
    assert [n for n, _ in frames] == ["OUTPUT", "LOG", "LOG", "LOG", "ERROR"]
    assert sum(b.num_rows for b in frames[0][1]) == 10       # the batches before the error
    assert logs_of(frames) == [("RClosure", "saw 0"), ("RClosure", "saw 5"), ("RClosure", "saw 10")]
    err = frames[-1][1]
    assert err["kind"] == "closure" and err["message"] == "late failure at 14"
    assert err["traceback"][0] == "f(df)"
    # the socket is in step: the next task runs on the same child
    frames = run_batches(peer, "function(df) df[df$x %% 2 == 0, ]", input_batches())
    assert frames[-1] == ("DONE", {"rows_in": 20, "rows_out": 10})


def test_error_before_any_result_is_a_plain_error(peer):
    frames = run_batches(peer, "function(df) { worker_log('first'); stop('at once') }",
                         input_batches())
    assert [n for n, _ in frames] == ["LOG", "ERROR"]
    assert frames[-1][1]["message"] == "at once"


def test_context_index_barrier_tags_per_batch(peer):
    closure = "function(df, ctx, index, barrier) data.frame(i = index, b = barrier$rank, c = ctx, n = nrow(df))"
    frames = run_batches(peer, closure, input_batches(3), context="cx", barrier={"rank": 7},
                         options={"partition_index_param": "index", "tag_units": True})
    table = pa.Table.from_batches(frames[0][1])
    assert table.schema.field("__wb_partition").type == pa.int64()
    assert table.to_pylist() == [{"i": 3, "b": 7, "c": "cx", "n": 5, "__wb_partition": 3,
                                  "__wb_unit": 0}] * 3
    assert frames[-1] == ("DONE", {"rows_in": 15, "rows_out": 3})


def test_empty_results_and_changing_columns(peer):
    # empty results are skipped; the stream starts with the first non-empty one
    frames = run_batches(peer, "function(df) if (df$x[1] < 10) NULL else df", input_batches())
    assert [b.num_rows for b in frames[0][1]] == [5, 5]
    assert frames[-1][1] == {"rows_in": 20, "rows_out": 10}
    # nothing at all: the first (empty) result's columns
    frames = run_batches(peer, "function(df) df[0, ]", input_batches())
    out = pa.Table.from_batches(frames[0][1], schema=frames[0][1][0].schema)
    assert out.num_rows == 0 and out.column_names == ["x", "s"]
    # an all-NA column may change type, integer may become double
    frames = run_batches(peer, "function(df) if (df$x[1] < 5) data.frame(a = 2.5, s = 'q') "
                               "else data.frame(a = 1L, s = NA)", input_batches())
    assert pa.Table.from_batches(frames[0][1]).to_pylist() == [
        {"a": 2.5, "s": "q"}, {"a": 1.0, "s": None}, {"a": 1.0, "s": None}, {"a": 1.0, "s": None}]
    # other changes: a codec error naming the column, after the stream's end
    frames = run_batches(peer, "function(df) if (df$x[1] < 10) data.frame(a = 1) "
                               "else data.frame(a = 'text')", input_batches())
    assert [n for n, _ in frames] == ["OUTPUT", "ERROR"]
    err = frames[-1][1]
    assert err["kind"] == "codec" and err["column"] == "a" and "first batch" in err["message"]
    frames = run_batches(peer, "function(df) if (df$x[1] < 10) data.frame(a = 1) "
                               "else data.frame(b = 1)", input_batches())
    assert frames[-1][1]["kind"] == "codec" and frames[-1][1]["column"] == "b"


def test_int64_options_and_decode_warnings_per_batch(peer):
    frames = run_batches(peer, "function(df) df", input_batches(3), options={"int64": "character"})
    assert frames[-1][1] == {"rows_in": 15, "rows_out": 15}
    assert pa.Table.from_batches(frames[0][1]).column("x").to_pylist()[:2] == ["0", "1"]
    # the int64 precision warning: once per column and task, after the stream
    big = [pa.record_batch({"x": pa.array([1, 2**60 + 1], pa.int64())})] * 3
    frames = run_batches(peer, "function(df) df", big)
    assert [n for n, _ in frames][:2] == ["OUTPUT", "LOG"]
    assert logs_of(frames).count(
        ("RScript", "column 'x': int64 values beyond 2^53 lost precision when converted to "
                    "double (use int64 = \"character\" for exact values)")) == 1


# ---------------------------------------------------------------------------
# Through Spark

@pytest.fixture
def batches_of_1000(spark):
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1000")
    yield
    spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


def test_spark_closure_called_once_per_batch(spark, batches_of_1000):
    tag = f"rbatch-{uuid.uuid4().hex[:8]}"
    df = spark.range(10_000).repartition(2)
    f = R(f'function(df) {{ worker_log("{tag} ", nrow(df)); df$n <- nrow(df); df }}')
    rows = spark_apply(df, f, schema="id long, n int", batch_mode="batch").collect()
    assert sorted(r.id for r in rows) == list(range(10_000))
    assert max(r.n for r in rows) <= 1000
    calls = [int(line.split()[-1]) for line in spark_log(spark, filter=tag, n=None)]
    assert len(calls) >= 10 and max(calls) <= 1000 and sum(calls) == 10_000
    done = spark_log(spark, filter="rows in", n=None)
    counts = [int(line.split(" in ")[-1].split()[0]) for line in done if line.endswith(" batches")]
    assert sum(counts[-2:]) == len(calls)


def test_spark_error_in_a_late_batch_fails_the_task(spark):
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
    try:
        df = spark.range(1000).repartition(1)
        f = R('function(df) { if (max(df$id) > 500) stop("late R failure at ", max(df$id)); df }')
        with pytest.raises(Exception, match="late R failure at 5"):
            spark_apply(df, f, schema="id long", batch_mode="batch").collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


# ---------------------------------------------------------------------------
# Memory: bounded by a batch, not the partition

BATCHES = 5000          # x 1000 rows = 5M rows
HEADROOM = 64 << 20     # R's heap between collections, buffers; the partition needs far more


def lazy_batches(n: int = BATCHES, rows: int = 1000):
    for i in range(n):
        base = i * rows
        yield pa.record_batch({"a": pa.array(np.arange(base, base + rows, dtype=np.int64)),
                               "x": pa.array(np.arange(base, base + rows) / 3.0),
                               "s": pa.array([f"s{j}" for j in range(base, base + rows)])})


def ipc_size(batch: pa.RecordBatch) -> int:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().size


@pytest.mark.parametrize("lang", ["r", "python"])
def test_batch_mode_memory_is_bounded_by_a_batch(lang):
    gw = Gateway(log_path=None)
    f = R("function(d) d") if lang == "r" else (lambda d: d)

    def spec(mode, limit=None):
        return TaskSpec(pack(f, None, {"batch_mode": mode}), RUNTIME.digest, None,
                        gw.address, WorkerOptions(memory_limit=limit, reuse=True))

    try:
        # the idle child's RSS: a one-batch task, then the child waits in the pool
        first = next(lazy_batches(1))
        probe = Worker(spec("batch"), 0, f"idle-{lang}", root=ROOT)
        assert sum(b.num_rows for b in probe.run(iter([first]))) == 1000
        pid = probe.stats["child_pid"]
        time.sleep(0.3)
        idle = psutil.Process(pid).memory_info().rss
        limit = idle + 3 * ipc_size(first) + HEADROOM
        # 5M rows through the same (warm) child under the limit: completes
        w = Worker(spec("batch", limit), 1, f"batch-{lang}", root=ROOT)
        t0 = time.monotonic()
        rows = 0
        for b in w.run(lazy_batches()):
            assert b.num_rows <= 1000
            rows += b.num_rows
        assert rows == BATCHES * 1000
        assert w.stats["rows_in"] == rows and w.stats["rows_out"] == rows
        peak = w.stats["peak_rss"]
        assert idle < peak <= limit
        print(f"{lang}: idle {idle / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB, "
              f"limit {limit / 2**20:.1f} MB, {time.monotonic() - t0:.1f} s")
        # the same limit with the whole partition in memory is breached
        with pytest.raises(LimitError, match="memory_limit"):
            for _ in Worker(spec("partition", limit), 2, f"partition-{lang}", root=ROOT).run(lazy_batches()):
                pass
    finally:
        POOL.close_all()
        gw.stop()
