"""Benchmark: spark_apply against Spark's in-process Arrow/pandas paths, in one session.

    .venv/bin/python bench/run.py                       # 1M rows x 5 columns, P=2
    .venv/bin/python bench/run.py --rows 100000 1000000 --partitions 2 8 --repeat 3

Every method runs an identity closure over a cached DataFrame of N rows x
(2 long, 2 double, 1 string), forced with the ``noop`` writer so no rows travel
to the driver.  Prints a table of median seconds with the ratio to
``mapInPandas`` and writes it as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def session():
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master("local[2]").appName("workerbridge-bench")
             .config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.driver.memory", "4g")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def data(spark, rows: int, partitions: int):
    from pyspark.sql import functions as F
    df = (spark.range(rows, numPartitions=partitions)
          .select(F.col("id").alias("a"), (F.col("id") * 7).alias("b"),
                  (F.col("id") / 3).alias("x"), F.rand(1).alias("y"),
                  F.concat(F.lit("s"), F.col("id").cast("string")).alias("s")))
    df = df.cache()
    df.count()
    return df


def methods(df, with_r: bool):
    from workerbridge import R, spark_apply
    schema = df.schema

    def map_in_arrow():
        return df.mapInArrow(lambda it: it, schema)

    def map_in_pandas():
        return df.mapInPandas(lambda it: it, schema)

    def py_apply():
        return spark_apply(df, lambda d: d, schema=schema)

    def py_apply_arrow():
        return spark_apply(df, lambda t: t, schema=schema, input="arrow")

    out = {"mapInArrow": map_in_arrow, "mapInPandas": map_in_pandas,
           "spark_apply Python": py_apply, "spark_apply Python (input=arrow)": py_apply_arrow}
    if with_r:
        def r_apply():
            return spark_apply(df, R("function(d) d"), schema=schema)
        out["spark_apply R"] = r_apply
    return out


def timed(build, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        out = build()
        t0 = time.perf_counter()
        out.write.format("noop").mode("overwrite").save()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--partitions", type=int, nargs="+", default=[2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--only", nargs="*", help="method names to run")
    args = ap.parse_args()
    with_r = not args.no_r and shutil.which("Rscript") is not None
    spark = session()
    results = []
    for rows in args.rows:
        for parts in args.partitions:
            df = data(spark, rows, parts)
            for name, build in methods(df, with_r).items():
                if args.only and name not in args.only:
                    continue
                timed(build, 1)                                       # warm-up
                times = timed(build, args.repeat)
                results.append({"method": name, "rows": rows, "partitions": parts,
                                "median_s": statistics.median(times), "runs_s": times})
                print(f"{name:34s} rows={rows:>9,d} P={parts:<3d} median {statistics.median(times):7.3f} s",
                      flush=True)
            df.unpersist()
    print()
    print(f"{'method':34s} {'rows':>9s} {'P':>3s} {'median s':>9s} {'x mapInPandas':>14s}")
    for r in results:
        base = next(b["median_s"] for b in results if b["method"] == "mapInPandas"
                    and b["rows"] == r["rows"] and b["partitions"] == r["partitions"]) \
            if any(b["method"] == "mapInPandas" for b in results) else float("nan")
        r["ratio_to_mapInPandas"] = r["median_s"] / base
        print(f"{r['method']:34s} {r['rows']:>9,d} {r['partitions']:>3d} {r['median_s']:9.3f} "
              f"{r['ratio_to_mapInPandas']:14.2f}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results",
                        time.strftime("bench-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "results": results}, f, indent=1)
    print(f"\nwritten {path}")
    spark.stop()


if __name__ == "__main__":
    main()
