"""Benchmark: spark_apply against Spark's in-process paths and rpy2, in one SparkSession.

    make bench                                            # the full matrix (~40 min, 2 cores)
    .venv/bin/python bench/run.py --rows 1000000 --partitions 2 --repeat 3
    .venv/bin/python bench/run.py --only mapInPandas "spark_apply R warm"
    .venv/bin/python bench/run.py --grouped-only --rows 1000000 --repeat 5   # vs applyInPandas
    .venv/bin/python bench/run.py --per-task --repeat 15     # 64 partitions of 100 rows

For each rows x partitions cell, every method runs an identity closure and a
small transform (``x * 2``) over a cached DataFrame of N rows x (2 long,
2 double, 1 string), forced with the ``noop`` writer so no rows travel to the
driver; each timing is the median of ``--repeat`` runs after one warm-up run,
the methods of a cell interleaved (round k times every method once).
Cold = a new child per partition (``reuse=False``), warm = children kept
between tasks (the default).  The grouped case (``--groups``, default 10,000
groups; ``--grouped-only`` runs nothing else) applies an identity closure per
group with ``group_by`` against ``groupBy().applyInPandas``, over
``--shuffle-partitions`` partitions.  Prints a table with the ratio to
``mapInPandas`` (grouped: to ``applyInPandas``),
the per-partition overhead (P=64 against P=2) and the peak RSS of the children,
and writes JSON and a PNG chart to bench/results/.

``--per-task`` measures what a partition costs when it holds almost nothing:
``--partitions`` (default 64) partitions of 100 rows each, identity only, and
for every method the wall time each task adds over ``mapInArrow``,
(t - t_mapInArrow) x slots / P, where slots is Spark's default parallelism
(the tasks run that many at a time).  Warm children are the point here, so it
runs mapInArrow, mapInPandas and the warm methods unless ``--only`` says otherwise,
with spark_apply's defaults (no memory_limit, so no RSS polling), and the warm
ones again with a memory_limit, which polls the child's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

HERE = os.path.dirname(os.path.abspath(__file__))


def session(max_records_per_batch: int = 100_000):
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master("local[2]").appName("workerbridge-bench")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.driver.memory", "6g")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(max_records_per_batch))
             # the peak-RSS lines are read back by position: keep every line
             .config("spark.workerbridge.log.maxLines", "10000000")
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


def have_rpy2() -> bool:
    try:
        import rpy2.robjects  # noqa: F401
        return True
    except Exception:       # noqa: BLE001 - any failure to load means: not available
        return False


def methods(with_r: bool, with_rpy2: bool, peaks: bool = True) -> dict:
    """name -> build(df, transform) returning a DataFrame.  ``peaks``: with a
    memory_limit far above use, which turns on the RSS polling that reports
    the children's peaks (and costs a little per task)."""
    from workerbridge import R, spark_apply
    watch = {"memory_limit": "1TB"} if peaks else {}

    def py(reuse, arrow=False):
        def build(df, transform):
            if arrow:
                import pyarrow.compute as pc
                f = (lambda t: t.set_column(2, "x", pc.multiply(t.column("x"), 2))) if transform \
                    else (lambda t: t)
                return spark_apply(df, f, schema=df.schema, input="arrow", reuse=reuse, **watch)
            f = (lambda d: d.assign(x=d.x * 2)) if transform else (lambda d: d)
            return spark_apply(df, f, schema=df.schema, reuse=reuse, **watch)
        return build

    def r(reuse):
        def build(df, transform):
            code = "function(d) { d$x <- d$x * 2; d }" if transform else "function(d) d"
            return spark_apply(df, R(code), schema=df.schema, reuse=reuse, **watch)
        return build

    def map_in_arrow(df, transform):
        import pyarrow.compute as pc
        if transform:
            return df.mapInArrow(lambda it: (b.set_column(2, "x", pc.multiply(b.column("x"), 2))
                                             for b in it), df.schema)
        return df.mapInArrow(lambda it: it, df.schema)

    def map_in_pandas(df, transform):
        if transform:
            return df.mapInPandas(lambda it: (d.assign(x=d.x * 2) for d in it), df.schema)
        return df.mapInPandas(lambda it: it, df.schema)

    def rpy2_in_pandas(df, transform):
        code = "function(d) { d$x <- d$x * 2; d }" if transform else "function(d) d"

        def run(it):
            import rpy2.robjects as ro
            from rpy2.robjects import pandas2ri
            from rpy2.robjects.conversion import localconverter
            f = ro.r(code)
            for pdf in it:
                with localconverter(ro.default_converter + pandas2ri.converter):
                    yield ro.conversion.get_conversion().rpy2py(
                        f(ro.conversion.get_conversion().py2rpy(pdf)))
        return df.mapInPandas(run, df.schema)

    out = {"mapInArrow": map_in_arrow, "mapInPandas": map_in_pandas,
           "spark_apply Python cold": py(False), "spark_apply Python warm": py(True),
           "spark_apply Python warm input=arrow": py(True, arrow=True)}
    if with_r:
        out["spark_apply R cold"] = r(False)
        out["spark_apply R warm"] = r(True)
    if with_rpy2:
        out["rpy2 in mapInPandas"] = rpy2_in_pandas
    return out


def grouped_methods(with_r: bool) -> dict:
    """name -> build(df) for the grouped case: an identity closure per group of "g"."""
    from workerbridge import R, spark_apply
    out = {"applyInPandas": lambda df: df.groupBy("g").applyInPandas(lambda d: d, df.schema),
           "spark_apply Python warm": lambda df: spark_apply(df, lambda d: d, schema=df.schema,
                                                             group_by="g")}
    if with_r:
        out["spark_apply R warm"] = lambda df: spark_apply(df, R("function(d) d"), schema=df.schema,
                                                           group_by="g")
    return out


def run_interleaved(spark, outs: dict, repeat: int) -> tuple[dict, dict]:
    """Median inputs: {name: [seconds]}, {name: [peak child RSS MB]}; one warm-up run
    each, then rounds that time every method once (the order rotating)."""
    from workerbridge import spark_log
    names = list(outs)
    for out in outs.values():
        timed(out, 1)
    times = {name: [] for name in names}
    peaks = {name: [] for name in names}
    for k in range(repeat):
        for name in names[k % len(names):] + names[:k % len(names)]:
            before = len(spark_log(spark, filter="peak RSS", n=None))
            times[name] += timed(outs[name], 1)
            peak = peak_rss_mb(spark, before)
            if peak:
                peaks[name].append(peak)
    return times, peaks


def grouped_cell(spark, rows: int, groups: int, shuffle: int, repeat: int, with_r: bool) -> list:
    from pyspark.sql import functions as F
    spark.conf.set("spark.sql.shuffle.partitions", str(shuffle))
    df = data(spark, rows, 2).withColumn("g", F.col("a") % groups).cache()
    df.count()
    times, _ = run_interleaved(spark, {n: b(df) for n, b in grouped_methods(with_r).items()},
                               repeat)
    df.unpersist()
    out = []
    for name, ts in times.items():
        out.append({"method": name, "closure": f"grouped ({groups:,} groups)", "rows": rows,
                    "partitions": shuffle, "median_s": statistics.median(ts), "runs_s": ts,
                    "peak_child_rss_mb": None})
        print(f"{name:38s} grouped   rows={rows:>9,d} P={shuffle:<3d} "
              f"median {out[-1]['median_s']:7.3f} s", flush=True)
    return out


def timed(out, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out.write.format("noop").mode("overwrite").save()
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mb(spark, before: int) -> float | None:
    from workerbridge import spark_log
    peaks = []
    for ln in spark_log(spark, filter="peak RSS", n=None)[before:]:
        m = re.search(r"([\d.]+) (B|KB|MB|GB)$", ln)
        if m:
            peaks.append(float(m.group(1)) * {"B": 2**-20, "KB": 2**-10, "MB": 1, "GB": 1024}[m.group(2)])
    return max(peaks) if peaks else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    ap.add_argument("--partitions", type=int, nargs="+",
                    help="partition counts (default 2 8 64; with --per-task, 64)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--no-transform", action="store_true", help="identity only")
    ap.add_argument("--only", nargs="*", help="method names to run")
    ap.add_argument("--groups", type=int, default=10_000, help="groups of the grouped case")
    ap.add_argument("--shuffle-partitions", type=int, default=8,
                    help="partitions of the grouped case (spark.sql.shuffle.partitions)")
    ap.add_argument("--grouped-only", action="store_true", help="only the grouped case")
    ap.add_argument("--no-grouped", action="store_true", help="skip the grouped case")
    ap.add_argument("--per-task", action="store_true",
                    help="tiny partitions (100 rows each): each task's cost over mapInArrow")
    ap.add_argument("--max-records-per-batch", type=int, default=100_000,
                    help="Spark's Arrow batch size (Spark's own default is 10,000)")
    args = ap.parse_args()
    with_r = not args.no_r and shutil.which("Rscript") is not None
    spark = session(args.max_records_per_batch)
    if args.per_task:
        per_task(spark, per_task_methods(with_r), args)
        spark.stop()
        return
    table = methods(with_r, have_rpy2())
    results = []
    if not args.no_grouped:
        for rows in args.rows:
            if rows <= 1_000_000 or args.grouped_only:
                results += grouped_cell(spark, rows, args.groups, args.shuffle_partitions,
                                        args.repeat, with_r)
    for rows in ([] if args.grouped_only else args.rows):
        for parts in args.partitions or [2, 8, 64]:
            df = data(spark, rows, parts)
            names = [name for name in table
                     if (not args.only or name in args.only)
                     and not (name.startswith("rpy2") and rows > 1_000_000)]  # minutes; 1M says enough
            for transform in ([False] if args.no_transform else [False, True]):
                closure = "transform" if transform else "identity"
                outs = {name: table[name](df, transform) for name in names}
                # interleaved: each round times every method once, so that a
                # slow spell of the machine does not land on one method only
                times, peaks = run_interleaved(spark, outs, args.repeat)
                for name in names:
                    rec = {"method": name, "closure": closure, "rows": rows, "partitions": parts,
                           "median_s": statistics.median(times[name]), "runs_s": times[name],
                           "peak_child_rss_mb": max(peaks[name]) if peaks[name] else None}
                    results.append(rec)
                    print(f"{name:38s} {closure:9s} rows={rows:>9,d} P={parts:<3d} "
                          f"median {rec['median_s']:7.3f} s", flush=True)
            df.unpersist()
    report(results)
    spark.stop()


PER_TASK_ROWS = 100        # rows in each partition of --per-task
PER_TASK_METHODS = ("mapInArrow", "mapInPandas", "spark_apply Python warm",
                    "spark_apply Python warm input=arrow", "spark_apply R warm",
                    "spark_apply Python warm memory_limit", "spark_apply R warm memory_limit")


def per_task_methods(with_r: bool) -> dict:
    """The methods with spark_apply's defaults, and the warm ones again with a
    memory_limit (its RSS polling is what a limit costs a task)."""
    out = methods(with_r, False, peaks=False)
    limited = methods(with_r, False, peaks=True)
    out.update({f"{n} memory_limit": b for n, b in limited.items()
                if n in ("spark_apply Python warm", "spark_apply R warm")})
    return out


def per_task(spark, table: dict, args) -> None:
    """Tiny partitions: each method's added wall time per task over mapInArrow."""
    parts = args.partitions or [64]
    names = [n for n in (args.only or PER_TASK_METHODS) if n in table]
    if "mapInArrow" not in names:
        names.insert(0, "mapInArrow")
    slots = spark.sparkContext.defaultParallelism
    rows_out = []
    for p in parts:
        df = data(spark, PER_TASK_ROWS * p, p)
        times, _ = run_interleaved(spark, {n: table[n](df, False) for n in names}, args.repeat)
        df.unpersist()
        base = statistics.median(times["mapInArrow"])
        print(f"\n{p} partitions x {PER_TASK_ROWS} rows, {slots} task slots, "
              f"medians of {args.repeat}:")
        print("| method | median s | ms per task | ms per task over mapInArrow | runs s |")
        print("|---|---|---|---|---|")
        for n in names:
            t = statistics.median(times[n])
            rec = {"method": n, "partitions": p, "rows": PER_TASK_ROWS * p, "median_s": t,
                   "runs_s": times[n], "ms_per_task": t * slots / p * 1000,
                   "ms_per_task_over_mapInArrow": (t - base) * slots / p * 1000}
            rows_out.append(rec)
            print(f"| {n} | {t:.3f} | {rec['ms_per_task']:.1f} | "
                  f"{rec['ms_per_task_over_mapInArrow']:+.1f} | "
                  f"{', '.join(f'{x:.2f}' for x in times[n])} |", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"per-task-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "slots": slots, "results": rows_out}, f, indent=1)
    print(f"\nwritten {path}")


def report(results: list) -> None:
    def base(r):
        want = "applyInPandas" if r["closure"].startswith("grouped") else "mapInPandas"
        for b in results:
            if (b["method"] == want and b["rows"] == r["rows"]
                    and b["partitions"] == r["partitions"] and b["closure"] == r["closure"]):
                return b["median_s"]
        return float("nan")

    print()
    print("| method | closure | rows | P | median s | x mapInPandas (grouped: applyInPandas) "
          "| peak child RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        r["ratio_to_mapInPandas"] = r["median_s"] / base(r)
        rss = f"{r['peak_child_rss_mb']:.0f}" if r.get("peak_child_rss_mb") else ""
        print(f"| {r['method']} | {r['closure']} | {r['rows']:,} | {r['partitions']} | "
              f"{r['median_s']:.3f} | {r['ratio_to_mapInPandas']:.2f} | {rss} |")
    overhead = per_partition_overhead(results)
    if overhead:
        print("\nper-partition overhead, (t(P=64) - t(P=2)) / 62, smallest rows, identity:")
        for name, ms in overhead.items():
            print(f"  {name:38s} {ms:7.1f} ms")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(HERE, "results", f"bench-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "results": results,
                   "per_partition_overhead_ms": overhead}, f, indent=1)
    print(f"\nwritten {path}")
    chart(results, os.path.join(HERE, "results", f"bench-{stamp}.png"))


def per_partition_overhead(results: list) -> dict:
    out = {}
    rows = min((r["rows"] for r in results), default=None)
    for name in dict.fromkeys(r["method"] for r in results):
        t = {r["partitions"]: r["median_s"] for r in results
             if r["method"] == name and r["rows"] == rows and r["closure"] == "identity"}
        if 2 in t and 64 in t:
            out[name] = (t[64] - t[2]) / 62 * 1000
    return out


def chart(results: list, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    cells = sorted({(r["rows"], r["partitions"]) for r in results if r["closure"] == "identity"})
    names = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(max(8, len(cells) * 1.4), 5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [next((r["median_s"] for r in results if r["method"] == name and r["closure"] == "identity"
                    and (r["rows"], r["partitions"]) == c), 0) for c in cells]
        ax.bar([k + i * width for k in range(len(cells))], ys, width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cells))])
    ax.set_xticklabels([f"{r // 1000:,}k rows\nP={p}" for r, p in cells], fontsize=8)
    ax.set_ylabel("median seconds (identity)")
    ax.set_yscale("log")
    ax.set_title(f"workerbridge benchmark, local[2], {time.strftime('%Y-%m-%d')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"written {path}")


if __name__ == "__main__":
    main()
