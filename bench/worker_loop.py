"""One Worker and one warm child on this machine, no Spark: the child's share of a task.

    .venv/bin/python bench/worker_loop.py --rows 500000 --lang r --tasks 16
    .venv/bin/python bench/worker_loop.py --lang r --keys 1000 --profile
    WORKERBRIDGE_RPROF=/tmp/r.prof .venv/bin/python bench/worker_loop.py --lang r
    Rscript -e 'summaryRprof("/tmp/r.prof")$by.total[1:30, ]'
    (the whole child's life, GC included; read it for shares: Rprof counts
    2 ms a sample, and the kernel may fire its timer less often)
    .venv/bin/py-spy record --subprocesses -f raw -o /tmp/w.raw -- \\
        .venv/bin/python bench/worker_loop.py --lang python

Runs the same partition (rows x (2 long, 2 double, 1 string), in Arrow
batches as Spark sends them) through Worker.run with reuse on, the
identity closure (batches of --batch-rows input rows), and prints each task's wall time and the median of the warm
ones (the first task starts the child).  ``--groups G`` runs ``sum(x)`` per
group of ``k = a mod G`` instead (``group_by``): the child's grouped path
(``--dict``: the Python closure returns a dict, not a DataFrame).  ``--env K=V`` passes variables to the
child (for example R_VSIZE=64M to compare R's default heap).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import psutil
import pyarrow as pa

from workerbridge.driver.closure import R, pack
from workerbridge.diagnostics.profiling import summarize
from workerbridge.diagnostics.tasks import tasks_from_events
from workerbridge.driver.gateway import Gateway
from workerbridge.task.pool import POOL
from workerbridge.task.runtime import Runtime
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker


def partition(rows: int, keys: int = 0, task: int = 0) -> pa.Table:
    """rows x (2 long, 2 double, 1 string); the string is "s<row>", or with
    ``keys`` one of that many distinct values, drawn at random.  Each ``task``
    gets ids (and so strings) of its own, as real tasks do: an R child that
    read the same strings again would find them still in its string cache
    and not pay for making them (nor for collecting them)."""
    ids = np.arange(rows, dtype=np.int64) + task * rows
    rng = np.random.default_rng(1)
    words = np.array([f"s{i}" for i in range(task * rows, task * rows + (keys or rows))],
                     dtype=object)
    s = words[rng.integers(0, keys, rows)] if keys else words
    return pa.table({"a": ids, "b": ids * 7, "x": ids / 3, "y": rng.random(rows),
                     "s": pa.array(s, pa.string())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--lang", choices=["r", "python"], default="r")
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--batch-rows", type=int, default=100_000,
                    help="rows per input batch (Spark's maxRecordsPerBatch; its default is 10,000)")
    ap.add_argument("--keys", type=int, default=0,
                    help="distinct values of the string column (default: every row its own)")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between tasks (an R child collects its garbage "
                         "when idle for 0.25 s, as between the runs of bench/run.py)")
    ap.add_argument("--same-strings", action="store_true",
                    help="every task the same rows (flatters R: its strings stay cached)")
    ap.add_argument("--profile", action="store_true",
                    help="profile=True: print the summed phases and top functions")
    ap.add_argument("--env", nargs="*", default=[], metavar="K=V")
    ap.add_argument("--groups", type=int, default=0, help="sum(x) per group of a mod G")
    ap.add_argument("--dict", action="store_true",
                    help="with --groups, Python: return {'s': sum} per group, not a DataFrame")
    args = ap.parse_args()
    tables = [partition(args.rows, args.keys, 0 if args.same_strings else i)
              for i in range(args.tasks)]
    table = tables[0]
    f = R("function(d) d") if args.lang == "r" else (lambda d: d)
    options, out_schema = {}, table.schema
    if args.groups:
        import pandas as pd
        tables = [t.append_column("k", pa.array(np.arange(args.rows) % args.groups))
                  for t in tables]
        f = R("function(d) data.frame(s = sum(d$x))") if args.lang == "r" else \
            (lambda d: {"s": float(d.x.sum())}) if args.dict else \
            (lambda d: pd.DataFrame({"s": [d.x.sum()]}))
        options, out_schema = {"group_by": ["k"]}, pa.schema([("k", pa.int64()), ("s", pa.float64())])
    batches = [t.to_batches(max_chunksize=args.batch_rows) for t in tables]
    del tables, table
    gw = Gateway(log_path=None)
    env = dict(kv.split("=", 1) for kv in args.env)
    runtime = Runtime.collect(args.lang == "r")
    root = str(runtime.materialize())
    spec = TaskSpec(pack(f, None, dict(options, profile=args.profile)), runtime.digest,
                    out_schema, gw.address,
                    WorkerOptions(reuse=True, env=env))
    times, child_cpu, own_cpu = [], [], []
    child = None
    try:
        for i in range(args.tasks):
            time.sleep(args.pause if i else 0)
            before = child.cpu_times()[:2] if child else (0.0, 0.0)
            t0, c0 = time.perf_counter(), time.process_time()
            worker = Worker(spec, 0, f"loop-{i}", root=root)
            rows = sum(b.num_rows for b in worker.run(iter(batches[i])))
            times.append(time.perf_counter() - t0)
            own_cpu.append(time.process_time() - c0)
            if child is None:
                child = psutil.Process(worker.child.pid)
            after = child.cpu_times()[:2]
            child_cpu.append((after[0] - before[0], after[1] - before[1]))
            assert rows == (args.groups or args.rows)
        peak = child_peak_rss(child.pid)
        if args.profile:          # the warm tasks only
            print(summarize(tasks_from_events(gw.events())[1:]))
    finally:
        POOL.close_all()
        gw.stop()
    print(f"{args.lang} {args.rows:,} rows per task: " + " ".join(f"{t:.3f}" for t in times))
    print(f"median of the warm tasks {statistics.median(times[1:]) * 1e3:.2f} ms "
          f"(first, with the child's start, {times[0]:.3f} s)")
    # CPU seconds move far less than wall time on a loaded machine; the mean,
    # as the kernel counts a process's CPU in 10 ms ticks
    user = statistics.mean(u for u, _ in child_cpu[1:])
    system = statistics.mean(s for _, s in child_cpu[1:])
    print(f"mean CPU of the warm tasks: child {(user + system) * 1e3:.2f} ms "
          f"(user {user * 1e3:.0f}, system {system * 1e3:.0f}), "
          f"Worker {statistics.mean(own_cpu[1:]) * 1e3:.2f} ms")
    print(f"peak RSS of the child over all tasks (VmHWM): {peak / 2**20:.0f} MB")


def child_peak_rss(pid: int) -> int:
    """The child's high-water resident set (Linux /proc VmHWM), in bytes: the
    true peak, where sampling would miss a short one."""
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
