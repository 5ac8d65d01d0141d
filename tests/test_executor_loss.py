"""An executor lost mid-job on the standalone test cluster: its JVM is killed (SIGKILL)
while children of both languages run closures on it.  Spark reruns the lost tasks; the
result must be exact (every id once), and no process the lost executor had started (its
Python daemon and workers, the PyScript / RScript children) may outlive it (by pid).

Reuses the cluster harness of ``test_cluster.py`` (its fixtures start a master and two
one-core workers on 127.0.0.1, executors in a venv without workerbridge).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from test_cluster import (DRIVER_PYTHON, clean_env, cluster, cluster_conf,  # noqa: F401
                          executor_python)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROWS, PARTITIONS = 8000, 4

CLIENT = r'''
import json, sys
cfg = json.loads(sys.argv[1])
from pyspark.sql import SparkSession
from workerbridge import R, spark_apply
b = SparkSession.builder.appName("workerbridge-executor-loss").master(cfg["master"])
for k, v in cfg["conf"].items():
    b = b.config(k, v)
spark = b.getOrCreate()
mark = cfg["mark"]

def hold(d):
    import os, time
    open(os.path.join(mark, f"child-python-{os.getpid()}"), "w").write("running")
    end = time.monotonic() + 120
    while not os.path.exists(os.path.join(mark, "killed-python")) and time.monotonic() < end:
        time.sleep(0.1)
    return d

R_HOLD = R("""function(d) {
  writeLines("running", file.path(MARK, paste0("child-r-", Sys.getpid())))
  end <- Sys.time() + 120
  while (!file.exists(file.path(MARK, "killed-r")) && Sys.time() < end) Sys.sleep(0.1)
  d
}""".replace("MARK", json.dumps(mark)))
df = spark.range(cfg["rows"], numPartitions=cfg["partitions"])
result = {}
for lang, f in (("python", hold), ("r", R_HOLD)):
    ids = sorted(r.id for r in spark_apply(df, f, schema="id long").collect())
    result[lang] = {"n": len(ids), "exact": ids == list(range(cfg["rows"]))}
print("RESULT " + json.dumps(result), flush=True)
spark.stop()
'''


def _executors(root: Path) -> list:
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "CoarseGrainedExecutorBackend" in cmd and str(root) in (p.info["cwd"] or ""):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _executor_running_a_child(root: Path, mark: Path, lang: str, client, err_path: Path,
                              timeout: float = 240):
    """(executor JVM, the pids below it) once one of its tasks' children is in its closure."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.poll() is not None:
            raise AssertionError(f"the client ended early ({client.returncode}):\n"
                                 + err_path.read_text()[-4000:])
        children = {int(p.name.rsplit("-", 1)[1]) for p in mark.glob(f"child-{lang}-*")}
        for jvm in _executors(root):
            try:
                below = {p.pid for p in jvm.children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
            if below & children:
                return jvm, below
        time.sleep(0.1)
    raise AssertionError("no executor ran a child in time:\n" + err_path.read_text()[-4000:])


def test_executor_killed_mid_job_gives_exact_result_and_leaves_no_child(
        cluster, executor_python, tmp_path):
    """One application, two jobs (Python, then R); an executor is killed during each."""
    mark = tmp_path / "mark"
    mark.mkdir()
    conf = dict(cluster_conf(cluster, executor_python, tmp_path),
                **{"spark.task.maxFailures": "4"})
    cfg = {"master": cluster.url, "conf": conf, "mark": str(mark),
           "rows": ROWS, "partitions": PARTITIONS}
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    out_path, err_path = tmp_path / "client.out", tmp_path / "client.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:      # files: a pipe fills up
        client = subprocess.Popen([DRIVER_PYTHON, str(script), json.dumps(cfg)],
                                  cwd=str(tmp_path), env=clean_env(PYSPARK_PYTHON=executor_python),
                                  stdout=out, stderr=err)
    below = set()
    try:
        for lang in ("python", "r"):
            jvm, pids = _executor_running_a_child(cluster.root, mark, lang, client, err_path)
            jvm.send_signal(signal.SIGKILL)
            jvm.wait(10)
            below |= pids
            (mark / f"killed-{lang}").write_text("")
        client.wait(240)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    out = out_path.read_text()
    found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert found, f"client exited {client.returncode}:\n{out[-2000:]}\n" \
                  f"{err_path.read_text()[-4000:]}"
    assert json.loads(found[-1][len("RESULT "):]) == {
        "python": {"n": ROWS, "exact": True}, "r": {"n": ROWS, "exact": True}}
    end = time.monotonic() + 20
    alive = below
    while alive and time.monotonic() < end:
        alive = {pid for pid in alive if _running(pid)}
        time.sleep(0.2)
    assert not alive, f"processes of the lost executor outlived it: {_describe(alive)}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(pids) -> list:
    out = []
    for pid in pids:
        try:
            out.append((pid, " ".join(psutil.Process(pid).cmdline())[:120]))
        except psutil.NoSuchProcess:
            pass
    return out
