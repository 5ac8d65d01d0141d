"""Load (many partitions, concurrent jobs, both languages) and Spark task retries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest

from workerbridge import R, spark_apply, spark_log
from workerbridge.wire.logline import parse_line


@pytest.mark.slow
def test_200_partitions_times_2_concurrent_jobs_both_languages(spark):
    df = spark.range(20_000).repartition(200)
    jobs = {"python": lambda d: d.assign(id=d.id + 1), "r": R("function(d) { d$id <- d$id + 1; d }")}
    before = len(spark_log(spark, n=None))
    results: dict = {}

    def run(lang):
        try:
            out = spark_apply(df, jobs[lang], schema="id long", reuse=True, idle_timeout=1)
            results[lang] = sorted(r.id for r in out.collect())
        except BaseException as e:  # noqa: BLE001
            results[lang] = e

    threads = [threading.Thread(target=run, args=(lang,)) for lang in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for lang in jobs:
        assert results[lang] == list(range(1, 20_001)), f"{lang}: {results[lang]!r:.300}"
    lines = spark_log(spark, n=None)[before:]
    parsed = [parse_line(ln) for ln in lines]
    assert all(parsed)
    starts = {p["id"] for p in parsed if p["message"].startswith("partition ")
              and "compute starting" in p["message"]}
    done = {p["id"] for p in parsed if p["message"].endswith("process completed")}
    assert len(starts) == 400 and starts == done
    rows = sum(int(m.group(1)) for p in parsed
               if (m := re.fullmatch(r"retrieved (\d+) rows", p["message"])))
    assert rows == 40_000
    from workerbridge.driver.session import session_key as _session_key
    from workerbridge.driver.gateway import Gateway
    assert Gateway.existing(_session_key(spark)).dropped == 0


RETRY_SCRIPT = textwrap.dedent("""
    import os, sys
    from pyspark.sql import SparkSession
    from workerbridge import R, spark_apply, spark_log
    marker_dir = sys.argv[1]
    spark = (SparkSession.builder.master("local[2,3]")          # 3 attempts per task
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .getOrCreate())
    spark.sparkContext.setLogLevel("OFF")
    df = spark.range(1000).repartition(4)

    def flaky(d):
        import os
        marker = os.path.join(%(dir)r, "py-%%d" %% int(d.id.min()))
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)                 # the first attempt of every task dies
        return d

    r_code = '''function(d) {
      marker <- file.path("%(dir)s", paste0("r-", format(min(d$id), scientific = FALSE)))
      if (!file.exists(marker)) { file.create(marker); quit(save = "no", status = 9) }
      d
    }'''
    for name, f in (("python", flaky), ("r", R(r_code))):
        ids = sorted(r.id for r in spark_apply(df, f, schema="id long").collect())
        print(name, len(ids), len(set(ids)), ids == list(range(1000)))
    print("failed attempts", len(spark_log(spark, filter="exit code 9", n=None)))
    spark.stop()
""")


def test_task_retry_after_a_first_attempt_failure(tmp_path):
    script = tmp_path / "retry.py"
    script.write_text(RETRY_SCRIPT % {"dir": str(tmp_path)})
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "python 1000 1000 True" in lines and "r 1000 1000 True" in lines, out.stdout
    assert len(list(tmp_path.glob("py-*"))) == 4 and len(list(tmp_path.glob("r-*"))) == 4
