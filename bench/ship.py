"""Benchmark: what shipping R packages costs, cold (new bundle) and warm (unpacked copy reused).

    .venv/bin/python bench/ship.py                       # Matrix + lattice, 5 rounds
    .venv/bin/python bench/ship.py --packages Matrix --rounds 7

Copies the named packages from this R's library into a driver-only library with their
version bumped (so the node's own copies do not match and the bundle is shipped), then
in one local[2] session, with warm children (the default), runs interleaved rounds of
three calls of an R closure over 20k rows in 2 partitions:

* cold: the bundle's content changed (a marker file per round): the driver hashes and
  packs it, Spark distributes it (``addFile``), both tasks meet it unpacked nowhere;
  one unpacks it under the lock, the other waits and reuses it;
* warm: the same bundle again: both tasks reuse the unpacked copy;
* none: ``ship=False``: the node's own (older) copies are loaded, nothing shipped.

Each call loads the packages in the child (``library()``), so the differences are
the cost of shipping.

Prints the medians and the Workers' own unpack / reuse times, and writes JSON to
bench/results/.  The machine's other load shows in the numbers: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def copy_packages(names: list, lib: Path) -> None:
    code = f"""
    for (p in c({", ".join(repr(n) for n in names)})) {{
      stopifnot(file.copy(find.package(p), '{lib}', recursive = TRUE))
      dst <- file.path('{lib}', p)
      d <- read.dcf(file.path(dst, 'DESCRIPTION')); v <- paste0(d[, 'Version'], '.9000')
      d[, 'Version'] <- v; write.dcf(d, file.path(dst, 'DESCRIPTION'))
      m <- readRDS(file.path(dst, 'Meta', 'package.rds'))
      m$DESCRIPTION[['Version']] <- v; saveRDS(m, file.path(dst, 'Meta', 'package.rds'))
    }}"""
    subprocess.run(["Rscript", "--vanilla", "-e", code], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", nargs="+", default=["Matrix", "lattice"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wb-ship-bench-"))
    lib = work / "lib"
    lib.mkdir()
    copy_packages(args.packages, lib)
    os.environ.update(TMPDIR=str(work), R_LIBS=str(lib), SPARK_LOCAL_IP="127.0.0.1",
                      PYSPARK_PYTHON=sys.executable)
    tempfile.tempdir = None                       # read TMPDIR again
    from pyspark.sql import SparkSession
    from workerbridge import R, spark_apply, spark_log
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    df = spark.range(20_000, numPartitions=2).selectExpr("id", "id / 2 AS x").cache()
    df.count()
    f = R("function(d) { d$y <- d$x * 2; d }")
    names = args.packages

    def timed(**opts) -> tuple:
        before = len(spark_log(spark, n=None))
        t0 = time.perf_counter()
        spark_apply(df, f, schema="id long, x double, y double", **opts).write.format("noop") \
            .mode("overwrite").save()
        wall = time.perf_counter() - t0
        lines = spark_log(spark, n=None)[before:]
        return wall, lines


    timed()                                      # warm-up: JVM, children
    walls = {"cold": [], "warm": [], "none": []}
    unpack_s, reuse_s, prepare_s, size = [], [], [], ""
    for k in range(args.rounds):
        (lib / names[0] / f"round-{k}").write_text(str(k))      # new content: a new bundle
        for kind, opts in (("cold", {"packages": names}), ("warm", {"packages": names}),
                           ("none", {"packages": names, "ship": False})):
            wall, lines = timed(**opts)
            walls[kind].append(wall)
            for ln in lines:
                m = re.search(r"unpacked the shipped .*\((\S+ \S+), from .*\) in ([\d.]+) s", ln)
                if m:
                    size = m.group(1)
                    unpack_s.append(float(m.group(2)))
                m = re.search(r"shipping R packages .* prepared in ([\d.]+) s", ln)
                if m:
                    prepare_s.append((kind, float(m.group(1))))
                m = re.search(r"reused the unpacked .* after ([\d.]+) s", ln)
                if m and kind == "warm":
                    reuse_s.append(float(m.group(1)))
    spark.stop()
    med = {k: round(statistics.median(v), 3) for k, v in walls.items()}
    out = {"packages": names, "bundle": size, "rounds": args.rounds, "median_s": med,
           "walls": walls, "unpack_s": unpack_s, "reuse_wait_s": reuse_s,
           "driver_prepare_s": prepare_s}
    print(json.dumps(out, indent=1))
    print(f"bundle {size}: cold {med['cold']} s, warm {med['warm']} s, nothing shipped "
          f"{med['none']} s per call (median of {args.rounds}); the Worker that unpacked: "
          f"median {statistics.median(unpack_s):.2f} s; a warm reuse: median "
          f"{statistics.median(reuse_s) * 1000:.1f} ms; the driver prepared the bundle in "
          f"{statistics.median(s for k, s in prepare_s if k == 'cold'):.2f} s (cold), "
          f"{statistics.median(s for k, s in prepare_s if k == 'warm'):.2f} s (warm)")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"ship-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(out))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
