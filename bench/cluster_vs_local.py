"""Benchmark: one spark_apply identity over 1M rows, local[2] against a 2-worker cluster.

    .venv/bin/python bench/cluster_vs_local.py                  # 1M rows, 2 partitions, 3 runs
    .venv/bin/python bench/cluster_vs_local.py --rows 100000 --partitions 2 4 --repeat 5

Starts a standalone master and two workers (1 core, 1 GiB each) on 127.0.0.1 with
pyspark's own ``bin/spark-class`` (the same code as ``tests/test_cluster.py``), whose
executors run a venv WITHOUT workerbridge (``--executor-python`` to choose another);
then times, in a fresh driver process per master, ``mapInArrow`` and ``spark_apply``
Python identity closures over a cached DataFrame of N rows x (2 long, 2 double,
1 string), forced with the ``noop`` writer: median of ``--repeat`` runs after a
warm-up.  Stops every process it started, prints a table and writes JSON to
bench/results/.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def run_one(cfg: dict) -> dict:
    """In the driver subprocess: build the session, time the methods, return medians."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from workerbridge import spark_apply

    b = SparkSession.builder.master(cfg["master"]).appName("workerbridge-cluster-bench")
    for k, v in cfg["conf"].items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    out = {}
    for parts in cfg["partitions"]:
        df = (spark.range(cfg["rows"], numPartitions=parts)
              .select(F.col("id").alias("a"), (F.col("id") * 7).alias("b"),
                      (F.col("id") / 3).alias("x"), F.rand(1).alias("y"),
                      F.concat(F.lit("s"), F.col("id").cast("string")).alias("s"))).cache()
        df.count()
        schema = df.schema
        methods = {
            "mapInArrow": lambda: df.mapInArrow(lambda it: it, schema),
            "spark_apply Python": lambda: spark_apply(df, lambda d: d, schema=schema),
            "spark_apply Python (input=arrow)":
                lambda: spark_apply(df, lambda t: t, schema=schema, input="arrow"),
        }
        for name, build in methods.items():
            times = []
            for i in range(cfg["repeat"] + 1):                    # the first is a warm-up
                t0 = time.perf_counter()
                build().write.format("noop").mode("overwrite").save()
                if i:
                    times.append(time.perf_counter() - t0)
            out[f"{name}|{parts}"] = {"median_s": statistics.median(times), "runs_s": times}
        df.unpersist()
    spark.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, nargs="+", default=[2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--executor-python", help="the executors' interpreter "
                    "(default: a fresh venv without workerbridge)")
    ap.add_argument("--run", help=argparse.SUPPRESS)                # internal: one driver
    args = ap.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(json.loads(args.run))), flush=True)
        return

    from test_cluster import Cluster, bare_venv, check_bare, clean_env

    root = Path(tempfile.mkdtemp(prefix="workerbridge-cluster-bench-"))
    python = args.executor_python
    if python is None:
        python = bare_venv(root / "venv")
        check_bare(python, root)
    base = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.local.dir": str(root / "local")}
    cluster = Cluster(root / "cluster")
    results = {}
    try:
        t0 = time.perf_counter()
        cluster.start()
        print(f"cluster {cluster.url} up in {time.perf_counter() - t0:.1f} s; executors run "
              f"{python}", flush=True)
        targets = {
            "local[2]": dict(base, **{"spark.driver.memory": "2g"}),
            "cluster 2x1 core": dict(base, **{"spark.executor.cores": "1",
                                              "spark.cores.max": "2",
                                              "spark.executor.memory": "1g"}),
        }
        for label, conf in targets.items():
            master = "local[2]" if label == "local[2]" else cluster.url
            cfg = {"master": master, "conf": conf, "rows": args.rows,
                   "partitions": args.partitions, "repeat": args.repeat}
            proc = subprocess.run([sys.executable, __file__, "--run", json.dumps(cfg)],
                                  cwd=str(root), env=clean_env(PYSPARK_PYTHON=python),
                                  capture_output=True, text=True, timeout=1800)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not found:
                raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            results[label] = json.loads(found[-1][len("RESULT "):])
            print(f"{label}: done", flush=True)
    finally:
        left = cluster.stop()
        if left:
            print(f"WARNING: processes left running: {left}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'method':34s} {'P':>3s} {'local[2] s':>11s} {'cluster s':>10s} {'cluster/local':>14s}")
    rows = []
    for key in results["local[2]"]:
        name, parts = key.split("|")
        local = results["local[2]"][key]["median_s"]
        remote = results["cluster 2x1 core"][key]["median_s"]
        rows.append({"method": name, "rows": args.rows, "partitions": int(parts),
                     "local2_median_s": local, "cluster_median_s": remote,
                     "local2_runs_s": results["local[2]"][key]["runs_s"],
                     "cluster_runs_s": results["cluster 2x1 core"][key]["runs_s"]})
        print(f"{name:34s} {parts:>3s} {local:11.3f} {remote:10.3f} {remote / local:14.2f}")
    load = os.getloadavg()
    os.makedirs(HERE / "results", exist_ok=True)
    path = HERE / "results" / time.strftime("cluster-vs-local-%Y%m%d-%H%M%S.json")
    with open(path, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "loadavg_after": load, "rows": args.rows,
                   "executor_python": python, "results": rows}, f, indent=1)
    print(f"\nload average after: {load[0]:.2f}; written {path}")


if __name__ == "__main__":
    main()
