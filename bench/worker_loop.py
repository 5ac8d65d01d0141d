"""One Worker and one warm child on this machine, no Spark: the child's share of a task.

    .venv/bin/python bench/worker_loop.py --rows 500000 --lang r --tasks 16
    WORKERBRIDGE_RPROF=/tmp/r.prof .venv/bin/python bench/worker_loop.py --lang r
    Rscript -e 'summaryRprof("/tmp/r.prof")$by.total[1:30, ]'
    .venv/bin/py-spy record --subprocesses -f raw -o /tmp/w.raw -- \\
        .venv/bin/python bench/worker_loop.py --lang python

Runs the same partition (rows x (2 long, 2 double, 1 string), in Arrow
batches as Spark sends them) through Worker.run with reuse on, the
identity closure (batches of --batch-rows input rows), and prints each task's wall time and the median of the warm
ones (the first task starts the child).  ``--env K=V`` passes variables to the
child (for example R_VSIZE=64M to compare R's default heap).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from workerbridge.driver.closure import R, pack
from workerbridge.driver.gateway import Gateway
from workerbridge.task.pool import POOL
from workerbridge.task.runtime import Runtime
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker


def partition(rows: int) -> pa.Table:
    ids = np.arange(rows, dtype=np.int64)
    rng = np.random.default_rng(1)
    return pa.table({"a": ids, "b": ids * 7, "x": ids / 3, "y": rng.random(rows),
                     "s": pa.array([f"s{i}" for i in range(rows)])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--lang", choices=["r", "python"], default="r")
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--batch-rows", type=int, default=100_000,
                    help="rows per input batch (Spark's maxRecordsPerBatch; its default is 10,000)")
    ap.add_argument("--env", nargs="*", default=[], metavar="K=V")
    args = ap.parse_args()
    table = partition(args.rows)
    batches = table.to_batches(max_chunksize=args.batch_rows)
    f = R("function(d) d") if args.lang == "r" else (lambda d: d)
    gw = Gateway(log_path=None)
    env = dict(kv.split("=", 1) for kv in args.env)
    runtime = Runtime.collect(args.lang == "r")
    root = str(runtime.materialize())
    spec = TaskSpec(pack(f), runtime.digest, table.schema, gw.address,
                    WorkerOptions(reuse=True, env=env))
    times = []
    try:
        for i in range(args.tasks):
            t0 = time.perf_counter()
            rows = sum(b.num_rows for b in Worker(spec, 0, f"loop-{i}", root=root).run(iter(batches)))
            times.append(time.perf_counter() - t0)
            assert rows == args.rows
    finally:
        POOL.close_all()
        gw.stop()
    print(f"{args.lang} {args.rows:,} rows per task: " + " ".join(f"{t:.3f}" for t in times))
    print(f"median of the warm tasks {statistics.median(times[1:]):.3f} s "
          f"(first, with the child's start, {times[0]:.3f} s)")


if __name__ == "__main__":
    main()
