"""The Worker joins Spark's small input batches before the child sees them
(partition mode), and keeps them as they are in batch mode."""

from __future__ import annotations

import pyarrow as pa

from workerbridge.driver.closure import pack
from workerbridge.driver.gateway import Gateway
from wbtest import ROOT, RUNTIME
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import COALESCE_ROWS, Worker


def run(f, options, batches):
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(f, None, options), RUNTIME.digest, None, gw.address,
                        WorkerOptions())
        return pa.Table.from_batches(list(Worker(spec, 0, "batching", root=ROOT).run(iter(batches))))
    finally:
        gw.stop()


def small_batches(n_batches, rows):
    return [pa.record_batch({"x": list(range(k * rows, (k + 1) * rows))}) for k in range(n_batches)]


def test_partition_mode_joins_small_batches():
    # 250 batches of 1000 rows (plus empty ones): the child gets batches of COALESCE_ROWS
    batches = small_batches(250, 1000)
    batches.insert(3, pa.record_batch({"x": pa.array([], pa.int64())}))
    chunks = lambda t: pa.table({"rows": [len(c) for c in t.column("x").chunks],  # noqa: E731
                                 "first": [c[0].as_py() for c in t.column("x").chunks]})
    out = run(chunks, {"input": "arrow"}, batches)
    assert out.column("rows").to_pylist() == [COALESCE_ROWS, COALESCE_ROWS, 50_000]
    assert out.column("first").to_pylist() == [0, COALESCE_ROWS, 2 * COALESCE_ROWS]


def test_batch_mode_keeps_spark_batches():
    out = run(lambda d: d.assign(n=len(d)), {"batch_mode": "batch"}, small_batches(7, 300))
    assert out.num_rows == 2100
    assert set(out.column("n").to_pylist()) == {300}
    assert out.column("x").to_pylist() == list(range(2100))
