"""Benchmark: grouped apply (``group_by=``) against Spark's ``applyInPandas``.

    .venv/bin/python bench/grouped.py                     # 1M rows, 10,000 groups, 5 rounds
    .venv/bin/python bench/grouped.py --rows 200000 --groups 2000 --repeat 3

One cached DataFrame of N rows (``k`` long, ``x`` double, ``k`` = id mod G);
every method computes ``sum(x)`` per group and is forced with the ``noop``
writer.  The methods are interleaved (round k times every method once, in a
rotated order) after one warm-up run each; the table gives the median and the
ratio to ``applyInPandas``.  Children are kept warm (the default).
"""

from __future__ import annotations

import argparse
import statistics

from run import session, timed


def methods(with_r: bool) -> dict:
    """name -> build(df) returning the per-group sums as a DataFrame."""
    import pandas as pd

    from workerbridge import R, spark_apply

    def apply_in_pandas(df):
        return df.groupBy("k").applyInPandas(
            lambda d: pd.DataFrame({"k": [d.k.iloc[0]], "s": [d.x.sum()]}), "k long, s double")

    def py(df):
        return spark_apply(df, lambda d: pd.DataFrame({"s": [d.x.sum()]}),
                           schema="k long, s double", group_by="k")

    def r(df):
        return spark_apply(df, R("function(d) data.frame(s = sum(d$x))"),
                           schema="k long, s double", group_by="k")

    out = {"applyInPandas": apply_in_pandas, "spark_apply Python group_by": py}
    if with_r:
        out["spark_apply R group_by"] = r
    return out


def main() -> None:
    import shutil

    from pyspark.sql import functions as F
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=4, help="spark.sql.shuffle.partitions")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-r", action="store_true")
    args = ap.parse_args()
    spark = session()
    spark.conf.set("spark.sql.shuffle.partitions", str(args.partitions))
    df = spark.range(args.rows, numPartitions=args.partitions).select(
        (F.col("id") % args.groups).alias("k"), F.rand(1).alias("x")).cache()
    df.count()
    table = methods(not args.no_r and shutil.which("Rscript") is not None)
    outs = {name: build(df) for name, build in table.items()}
    names = list(outs)
    for out in outs.values():
        timed(out, 1)                                              # warm-up
    times = {name: [] for name in names}
    for k in range(args.repeat):
        for name in names[k % len(names):] + names[:k % len(names)]:
            times[name] += timed(outs[name], 1)
            print(f"round {k}: {name:30s} {times[name][-1]:8.2f} s", flush=True)
    base = statistics.median(times["applyInPandas"])
    print(f"\nrows={args.rows:,} groups={args.groups:,} P={args.partitions} "
          f"rounds={args.repeat} (interleaved)")
    print("| method | median s | x applyInPandas | runs s |")
    print("|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {med:.3f} | {med / base:.2f} | {runs} |")
    spark.stop()


if __name__ == "__main__":
    main()
