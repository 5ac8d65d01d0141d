"""Logs from another host: a Spark Worker in a network namespace (``twohosts``), the master
and the driver in the root namespace; executors' Python without workerbridge.

Checked for real: Python and R jobs give exact rows and every task's lifecycle lines reach
``spark_log`` on the driver, through the Gateway on the driver's address; a Gateway the
executors have no route to costs no row, says so once per executor process, keeps the lines
in the executors' stderr, puts a failed task's lines in its exception, and with Spark's own
Python worker logging on, ``spark_log`` still has every line (from Spark's table), once.
The load case: 400 tasks in 2 concurrent jobs on 2 executors of the other host.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from test_cluster import executor_python  # noqa: F401 - a fixture, shared
from test_cluster import processes_under, run_client
from twohosts import TwoHosts, skip_reason

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CLIENT_CODE = r'''
import json, re, sys, threading, time, traceback
cfg = json.loads(sys.argv[1])
from pyspark.sql import SparkSession
from workerbridge import R, spark_apply, spark_log
from workerbridge.driver.session import session_gateway as _gateway
from workerbridge.wire.logline import parse_line
b = SparkSession.builder.appName(cfg["app"]).master(cfg["master"])
for k, v in cfg["conf"].items():
    b = b.config(k, v)
spark = b.getOrCreate()

def python_f(d):
    return d.assign(y=d.id * 2)

R_F = R("function(d) { d$y <- d$id * 2; d }")

def run(lang, parts, rows, reuse):
    df = spark.range(rows, numPartitions=parts)
    f = python_f if lang == "python" else R_F
    got = spark_apply(df, f, schema="id long, y long", reuse=reuse).toArrow()
    ids = sorted(got.column("id").to_pylist())
    return {"rows": got.num_rows, "exact": ids == list(range(rows)) and
            got.column("y").to_pylist() == [2 * i for i in got.column("id").to_pylist()]}

def tasks(lines):
    """partition -> {'id', 'retrieved', 'finished', 'completed'} from executors' lines."""
    by_id, out = {}, {}
    for ln in lines:
        p = parse_line(ln)
        if p is None or p["id"].startswith("driver-"):
            continue
        by_id.setdefault(p["id"], []).append((p["role"], p["message"]))
    for ident, msgs in by_id.items():
        part = [int(m.group(1)) for r, t in msgs if r == "Worker"
                for m in [re.match(r"partition (\d+) compute starting", t)] if m]
        rows = [int(m.group(1)) for r, t in msgs if r.endswith("Script")
                for m in [re.match(r"retrieved (\d+) rows", t)] if m]
        for p in part:
            out.setdefault(str(p), []).append({
                "id": ident, "rows": sum(rows),
                "finished": any(r.endswith("Script") and t == "finished" for r, t in msgs),
                "completed": any(r == "Worker" and t.endswith("process completed")
                                 for r, t in msgs)})
    return out

out = {"app_id": spark.sparkContext.applicationId}
for lang in cfg.get("languages", []):
    before = len(spark_log(spark, n=None))
    res = run(lang, cfg["partitions"], cfg["rows"], False)
    lines = spark_log(spark, n=None)[before:]
    res["tasks"] = tasks(lines)
    res["lines"] = lines
    res["duplicates"] = len(lines) - len(set(lines))
    out[lang] = res
if cfg.get("failing"):
    def boom(d):
        if d.id.min() == 0:
            raise ValueError("closure refuses partition zero")
        return d
    try:
        spark_apply(spark.range(100, numPartitions=2), boom, schema="id long").count()
        out["failing"] = "no error"
    except Exception as e:
        out["failing"] = str(e)[-20000:]
if cfg.get("load"):
    import psutil
    gw = _gateway(spark)
    me = psutil.Process()
    rss0 = me.memory_info().rss
    results, before, t0 = {}, len(spark_log(spark, n=None)), time.perf_counter()
    def job(lang):
        try:
            results[lang] = run(lang, cfg["load"], cfg["load"] * 50, True)
        except Exception as e:
            results[lang] = {"error": str(e)[-3000:]}
    threads = [threading.Thread(target=job, args=(lang,)) for lang in ("python", "r")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    lines = spark_log(spark, n=None)[before:]
    out["load"] = {"seconds": round(time.perf_counter() - t0, 1), "jobs": results,
                   "tasks": tasks(lines), "lines": len(lines), "counts": gw.counts,
                   "held_bytes": gw.held_bytes, "dropped": gw.dropped,
                   "driver_rss_growth": me.memory_info().rss - rss0,
                   "threads": [t.name for t in threading.enumerate()
                               if t.name.startswith("workerbridge-gateway")]}
spark.stop()
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    why = skip_reason()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("twohosts")
    hosts = TwoHosts(root)
    try:
        hosts.make().start_spark(cores=2)
    except BaseException:
        hosts.stop()
        hosts.delete()
        raise
    yield hosts
    left = hosts.stop()
    hosts.delete()
    deadline = time.monotonic() + 15
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    stray = processes_under(root)
    assert not left and not stray, f"processes outlived the cluster: {left} {stray}"
    assert not hosts.exists(), f"namespace {hosts.ns} is still there"


def client(hosts: TwoHosts, python: str, tmp: Path, cfg: dict, **conf: str) -> dict:
    return run_client({"conf": hosts.conf(python, tmp, **conf), "master": hosts.url, **cfg},
                      tmp, env={"PYSPARK_PYTHON": python, "SPARK_LOCAL_IP": hosts.driver_ip},
                      timeout=900, script=CLIENT_CODE)


def assert_every_task_logged(tasks: dict, partitions: int, rows: int, what: str) -> None:
    assert sorted(tasks, key=int) == [str(p) for p in range(partitions)], \
        f"{what}: partitions without a 'compute starting' line: " \
        f"{sorted(set(map(str, range(partitions))) - set(tasks), key=int)[:20]}"
    missing = {p: t for p, ts in tasks.items() for t in ts
               if len(ts) != 1 or not (t["finished"] and t["completed"])}
    assert not missing, f"{what}: tasks without their whole lifecycle: {list(missing.items())[:5]}"
    assert sum(ts[0]["rows"] for ts in tasks.values()) == rows, what


@pytest.fixture(scope="module")
def reachable(two_hosts, executor_python, tmp_path_factory) -> dict:
    """One application (a driver's JVM costs ~20 s here): both languages, a failing task,
    then the load."""
    return client(two_hosts, executor_python, tmp_path_factory.mktemp("reachable"),
                  {"app": "wb-two-hosts", "languages": ["python", "r"], "rows": 4000,
                   "partitions": 4, "failing": True, "load": 200})


def test_both_languages_log_to_the_driver_from_another_host(two_hosts, reachable):
    res = reachable
    for lang in ("python", "r"):
        case = res[lang]
        assert case["rows"] == 4000 and case["exact"], (lang, case["rows"])
        assert_every_task_logged(case["tasks"], 4, 4000, lang)
        assert case["duplicates"] == 0
    gateway_start = [ln for ln in res["python"]["lines"] if "Gateway" in ln]
    assert any("accepted registration of Worker" in ln for ln in gateway_start)
    # a failed task's lines travel in its exception, whatever the Gateway got
    failing = res["failing"]
    assert "closure refuses partition zero" in failing
    assert "the task's log lines" in failing and re.search(r"PyScript \(\d+\) retrieved 50 rows",
                                                             failing), failing[-3000:]
    stderr = two_hosts.executor_stderr(res["app_id"])
    assert "cannot reach the Gateway" not in stderr, stderr[-3000:]


def test_unroutable_gateway_keeps_rows_and_lines(two_hosts, executor_python, tmp_path):
    """The Gateway on an address the other host has no route to: exact rows, one warning
    per executor process, lines in the executors' stderr, and (Spark's Python worker
    logging on) every line in spark_log from Spark's own table, once."""
    res = client(two_hosts, executor_python, tmp_path / "c",
                 {"app": "wb-no-route", "languages": ["python", "r"], "rows": 4000,
                  "partitions": 4, "failing": True},
                 **{"spark.workerbridge.gateway.host": two_hosts.unroutable,
                    "spark.sql.pyspark.worker.logging.enabled": "true"})
    stderr = two_hosts.executor_stderr(res["app_id"])
    warnings = re.findall(r"cannot reach the Gateway at [\d.]+:\d+ \(([^)]*)\)", stderr)
    assert warnings and all("unreachable" in w.lower() for w in warnings), stderr[-3000:]
    python_workers = set(re.findall(r"Worker \((\d+)\) started PyScript", stderr))
    tasks_run = len(re.findall(r"compute starting", stderr))
    assert len(warnings) < tasks_run, (len(warnings), tasks_run)   # once per process, not task
    # the Python job's 4000 rows, the failing job's partition 0 (and 1, unless cancelled
    # first); a task's line shows again in the executor's log of its exception: once each
    retrieved = set(re.findall(r"PyScript \((\d+)\) retrieved (\d+) rows", stderr))
    assert sum(int(n) for _, n in retrieved) in (4050, 4100), sorted(retrieved)
    for lang in ("python", "r"):
        case = res[lang]
        assert case["rows"] == 4000 and case["exact"], lang
        # no Gateway line from an executor, yet every task is in spark_log: Spark's table
        assert_every_task_logged(case["tasks"], 4, 4000, lang + " (from Spark's table)")
        assert case["duplicates"] == 0, lang
    assert "the task's log lines" in res["failing"] and "closure refuses" in res["failing"]
    assert python_workers


def test_load_400_tasks_two_jobs_every_line_delivered(two_hosts, reachable, tmp_path):
    res = reachable
    load = res["load"]
    (tmp_path / "load.json").write_text(json.dumps(load, indent=1))
    print("two-host load:", json.dumps({k: v for k, v in load.items() if k != "tasks"}))
    for lang, job in load["jobs"].items():
        assert "error" not in job, job
        assert job["rows"] == 200 * 50 and job["exact"], lang
    tasks = load["tasks"]
    assert len(tasks) == 200 and all(len(ts) == 2 for ts in tasks.values()), \
        {p: len(ts) for p, ts in tasks.items() if len(ts) != 2}
    for p, ts in tasks.items():
        assert all(t["finished"] and t["completed"] for t in ts), (p, ts)
    assert sum(t["rows"] for ts in tasks.values() for t in ts) == 2 * 200 * 50
    counts = load["counts"]
    assert counts["written"] == counts["delivered"] and counts["written"] >= 400 * 5, counts
    assert load["dropped"] == 0 and load["threads"] == ["workerbridge-gateway"]
    assert "cannot reach" not in two_hosts.executor_stderr(res["app_id"])
