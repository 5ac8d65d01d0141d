"""A real Spark standalone cluster on loopback: one master, two workers, executors in a
venv WITHOUT workerbridge.

The test process already holds the suite's local SparkContext, and a second one cannot
live beside it, so the cluster's client (the driver) runs in a subprocess: the script
``CLIENT`` below, run with this interpreter (which has workerbridge).  It prints one
JSON line; the tests assert on it.

Also used by ``test_connect.py``: :func:`bare_venv`, :func:`run_client`,
:func:`stop_tree`, :func:`free_port`, :func:`clean_env`.

Executors' Python can be overridden with ``WORKERBRIDGE_TEST_EXECUTOR_PYTHON`` (for
example ``.venv/bin/python``, which has workerbridge) to check the harness itself.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path
from typing import Optional

import psutil
import pytest

pytestmark = pytest.mark.cluster

MAIN = Path(__file__).resolve().parents[1]
DRIVER_PYTHON = sys.executable                     # has workerbridge (editable install)
ROWS, PARTITIONS = 10_000, 4
START_TIMEOUT_S = 90


def spark_home() -> str:
    import pyspark
    return os.path.dirname(os.path.abspath(pyspark.__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without anything that would put workerbridge on a path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYSPARK_DRIVER_PYTHON",
                        "PYSPARK_PYTHON", "SPARK_CONF_DIR", "SPARK_HOME")}
    env.update(SPARK_HOME=spark_home(), SPARK_LOCAL_IP="127.0.0.1")
    env.update(extra)
    return env


# ---- a venv without workerbridge -------------------------------------------------------
def bare_venv(root: Path, extra_paths: tuple = ()) -> str:
    """A venv whose site-packages holds only ``deps.pth`` → this venv's site-packages.

    A directory named in a .pth is put on sys.path but is not itself a site dir, so the
    .pth files inside it (the editable install's finder) are not processed: pyspark,
    pandas, pyarrow, cloudpickle and psutil import, workerbridge does not (unless one of
    ``extra_paths``, which come first, holds one).
    """
    subprocess.run([DRIVER_PYTHON, "-m", "venv", "--without-pip", str(root)], check=True,
                   cwd=str(root.parent), env=clean_env())
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root),
                                                     "platbase": str(root)}))
    site.mkdir(parents=True, exist_ok=True)
    deps = sysconfig.get_path("purelib")
    (site / "deps.pth").write_text("".join(f"{p}\n" for p in (*extra_paths, deps)))
    return str(root / "bin" / "python")


def probe(python: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=str(cwd), env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def check_bare(python: str, cwd: Path) -> None:
    deps = probe(python, "import pyarrow, pandas, cloudpickle, psutil, pyspark", cwd)
    assert deps.returncode == 0, deps.stderr
    wb = probe(python, "import workerbridge", cwd)
    assert wb.returncode != 0 and "No module named 'workerbridge'" in wb.stderr, \
        f"workerbridge is importable from {python}: {wb.stdout}{wb.stderr}"


@pytest.fixture(scope="module")
def executor_python(tmp_path_factory) -> str:
    override = os.environ.get("WORKERBRIDGE_TEST_EXECUTOR_PYTHON")
    if override:
        return override
    root = tmp_path_factory.mktemp("bare")
    python = bare_venv(root / "venv")
    check_bare(python, root)
    return python


# ---- processes -------------------------------------------------------------------------
def stop_tree(pid: int, timeout: float = 15.0) -> list:
    """End ``pid`` and every process below it (SIGTERM, then SIGKILL); the pids left."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def processes_under(root: Path) -> list:
    """Processes whose command line or working directory lies under ``root``."""
    found, mark = [], str(root)
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            cwd = p.info["cwd"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid != os.getpid() and (mark in cmd or cwd.startswith(mark)):
            found.append((p.pid, cmd[:200]))
    return found


def wait_for(what: str, check, procs: list, timeout: float = START_TIMEOUT_S, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: pid {proc.pid} exited ({proc.returncode}); "
                                   + _tails(logs))
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not within {timeout} s; " + _tails(logs))


def _tails(logs) -> str:
    out = []
    for path in logs:
        try:
            out.append(f"--- {path}\n" + Path(path).read_text(errors="replace")[-2000:])
        except OSError:
            pass
    return "\n".join(out)


class Cluster:
    """A standalone master and ``workers`` workers on 127.0.0.1, started with pyspark's
    own ``bin/spark-class``; :meth:`stop` ends every process it started, by pid."""

    def __init__(self, root: Path, workers: int = 2):
        self.root = root
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.procs: list = []
        self.logs: list = []
        self.workers = workers

    def _spawn(self, name: str, args: list, env: dict) -> subprocess.Popen:
        logdir = self.root / name
        logdir.mkdir(parents=True, exist_ok=True)
        log = logdir / "out.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [os.path.join(spark_home(), "bin", "spark-class"), *args],
                cwd=str(logdir), env=clean_env(SPARK_LOG_DIR=str(logdir), **env),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def master_state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as r:
            return json.load(r)

    def start(self) -> "Cluster":
        # The REST submission server would take a fixed port (6066); not needed.
        self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.port), "--webui-port", str(self.ui_port)],
                    {"SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"})
        wait_for("master", lambda: self.master_state().get("status") == "ALIVE",
                 self.procs, logs=self.logs)
        for i in range(self.workers):
            work = self.root / f"worker{i}" / "work"
            work.mkdir(parents=True, exist_ok=True)
            self._spawn(f"worker{i}", [
                "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()),
                "--work-dir", str(work), self.url], {"SPARK_WORKER_DIR": str(work)})
        wait_for("workers registered",
                 lambda: self.master_state().get("aliveworkers") == self.workers
                 and all("Successfully registered with master" in Path(log).read_text(
                     errors="replace") for log in self.logs[1:]),
                 self.procs, logs=self.logs)
        return self

    def stop(self) -> list:
        left = []
        for proc in reversed(self.procs):           # workers (and their executors) first
            left += stop_tree(proc.pid)
            try:
                proc.wait(10)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
        return left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    c = Cluster(root)
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    yield c
    left = c.stop()
    deadline = time.monotonic() + 15
    stray = processes_under(root)
    while stray and time.monotonic() < deadline:
        time.sleep(0.5)
        stray = processes_under(root)
    assert not left and not stray, f"cluster processes outlived teardown: {left} {stray}"


# ---- the client (driver) script ----------------------------------------------------------
CLIENT = r'''
import json, sys, time, traceback
cfg = json.loads(sys.argv[1])
from pyspark.sql import SparkSession
from workerbridge import R, spark_apply, spark_log
from workerbridge.driver import compat
from workerbridge.wire.logline import SAMPLE_ID_BASE, parse_line

b = SparkSession.builder.appName(cfg.get("app", "workerbridge-client"))
b = b.remote(cfg["remote"]) if cfg.get("remote") else b.master(cfg["master"])
for k, v in cfg.get("conf", {}).items():
    b = b.config(k, v)
spark = b.getOrCreate()
N, P = cfg["rows"], cfg["partitions"]
df = spark.range(N, numPartitions=P).selectExpr("id", "id / 2 AS x")

def double(d):
    import sys
    return d.assign(y=d.x * 2, exe=sys.executable)

R_DOUBLE = R("function(d) { d$y <- d$x * 2; d$exe <- R.home(); d }")
CASES = {
    "python schema": (double, "id long, x double, y double, exe string"),
    "python inferred": (double, None),
    "r schema": (R_DOUBLE, "id long, x double, y double, exe string"),
    "r inferred": (R_DOUBLE, None),
}
out = {"session": type(spark).__module__, "cases": {}}
for name in cfg.get("cases", list(CASES)):
    f, schema = CASES[name]
    before = len(spark_log(spark, n=None))
    t0 = time.perf_counter()
    res = {}
    try:
        result = spark_apply(df, f, schema=schema)
        table = compat.to_arrow(result)
        pdf = table.to_pandas()
        res.update(
            rows=int(table.num_rows), columns=table.column_names,
            types=[str(t) for t in table.schema.types],
            ids_ok=bool(sorted(pdf["id"].astype("int64").tolist()) == list(range(N))),
            values_ok=bool(((pdf["y"] - pdf["id"].astype("float64")).abs() < 1e-9).all()),
            exe=sorted(set(pdf["exe"].tolist())))
    except Exception as e:
        res["error"] = "".join(traceback.format_exception_only(type(e), e))[-6000:]
    res["seconds"] = round(time.perf_counter() - t0, 3)
    lines = spark_log(spark, n=None)[before:]
    res["lines"] = [ln for ln in lines if cfg.get("log_filter", "") in ln]
    retrieved = {}
    for ln in lines:
        p = parse_line(ln)
        m = p and p["role"] in ("PyScript", "RScript") and \
            __import__("re").match(r"retrieved (\d+) rows", p["message"])
        if m and not int(p["id"]) >= SAMPLE_ID_BASE:
            retrieved[p["id"]] = retrieved.get(p["id"], 0) + int(m.group(1))
    res["retrieved_by_task"] = retrieved
    out["cases"][name] = res
if cfg.get("extras"):
    import tempfile
    import pandas as pd
    import pyarrow as pa
    from pyspark.sql.types import LongType, StructField, StructType
    from workerbridge.driver.api import log_path
    extras = out["extras"] = {"tempdir": tempfile.gettempdir()}

    def attempt(key, fn):
        try:
            extras[key] = fn()
        except Exception as e:
            extras[key] = "ERROR " + "".join(traceback.format_exception_only(type(e), e))[-3000:]

    def barrier_f(d, barrier):
        return pd.DataFrame({"part": [barrier["partition"]], "n": [len(barrier["address"])]})

    groups = df.selectExpr("id % 3 AS g", "id")
    attempt("group_by", lambda: sorted(
        [int(r[0]), int(r[1])] for r in
        spark_apply(groups, lambda d: pd.DataFrame({"n": [len(d)]}), group_by="g").collect()))
    attempt("list", lambda: sorted(int(v) for v in
                                   spark_apply(df, lambda d: len(d), fetch_result_as_sdf=False)))
    attempt("barrier", lambda: sorted(
        [int(r[0]), int(r[1])] for r in
        spark_apply(spark.range(20, numPartitions=2), barrier_f, barrier=True, schema="part int, n int").collect()))
    attempt("struct schema", lambda: spark_apply(       # analysed by the server, no job
        df, lambda d: d[["id"]], schema=StructType([StructField("id", LongType())])).dtypes)
    attempt("arrow schema", lambda: spark_apply(
        df, lambda d: d[["id"]], schema=pa.schema([("id", pa.int64())])).dtypes)
    attempt("r context", lambda: sorted(set(int(r[0]) for r in spark_apply(
        df, R("function(d, ctx) data.frame(k = rep(ctx$k, nrow(d)))"), context={"k": 7},
        schema="k long").collect())))
    attempt("spark_log without spark", lambda: len(spark_log(n=None)))
    attempt("log_path", lambda: log_path(spark))
if cfg.get("unreachable_gateway"):
    # What an executor on another host sees: nothing listens at the Gateway's address.
    # The Gateway closes its socket but stays the session's Gateway.
    from workerbridge.driver.session import session_gateway
    session_gateway(spark).stop_listening()
    before = len(spark_log(spark, n=None))
    try:
        table = compat.to_arrow(spark_apply(df, double, schema=CASES["python schema"][1]))
        out["unreachable"] = {"rows": table.num_rows, "ids_ok": sorted(
            table.column("id").to_pylist()) == list(range(N))}
    except Exception as e:
        out["unreachable"] = {"error": "".join(traceback.format_exception_only(type(e), e))}
    out["unreachable"]["new_lines"] = spark_log(spark, n=None)[before:]
try:
    out["app_id"] = spark.sparkContext.applicationId
except Exception:
    out["app_id"] = None
out["log_lines"] = len(spark_log(spark, n=None))
try:
    spark.stop()
except Exception:
    pass
print("RESULT " + json.dumps(out), flush=True)
'''


def run_client(cfg: dict, workdir: Path, timeout: float = 240, env: Optional[dict] = None,
               script: str = CLIENT) -> dict:
    """Run ``script`` (``CLIENT`` by default) with ``cfg`` in a subprocess; its JSON result."""
    workdir.mkdir(parents=True, exist_ok=True)
    code, script = script, workdir / "client.py"
    script.write_text(code)
    cfg = {"rows": ROWS, "partitions": PARTITIONS, **cfg}
    proc = subprocess.run([DRIVER_PYTHON, str(script), json.dumps(cfg)], cwd=str(workdir),
                          env=clean_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    (workdir / "client.out").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert found, (f"client exited {proc.returncode} without a result:\n"
                   f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(found[-1][len("RESULT "):])
    result["returncode"] = proc.returncode
    return result


def cluster_conf(cluster: Cluster, executor_python: str, tmp: Path) -> dict:
    # PySpark takes the workers' interpreter from PYSPARK_PYTHON in the driver's
    # environment (run_client's env=); spark.pyspark.python only counts for spark-submit.
    return {
        "spark.pyspark.python": executor_python,
        "spark.executorEnv.PYSPARK_PYTHON": executor_python,
        "spark.pyspark.driver.python": DRIVER_PYTHON,
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.executor.cores": "1",
        "spark.cores.max": "2",
        "spark.executor.memory": "1g",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.local.dir": str(tmp / "local"),
        "spark.task.maxFailures": "1",
        "spark.workerbridge.reuse": "false",
    }


def assert_case(res: dict, name: str, rows: int = ROWS, python: Optional[str] = None) -> None:
    assert "error" not in res, f"{name} failed:\n{res.get('error')}"
    assert res["rows"] == rows and res["ids_ok"] and res["values_ok"], (name, res)
    assert res["columns"] == ["id", "x", "y", "exe"], (name, res["columns"])
    if python is not None and name.startswith("python"):
        assert res["exe"] == [python], (name, res["exe"])
    role = "PyScript" if name.startswith("python") else "RScript"
    assert sum(res["retrieved_by_task"].values()) == rows, \
        (f"{name}: the executors' '{role} ... retrieved N rows' lines do not add up to "
         f"{rows}: {res['retrieved_by_task']}\n" + "\n".join(res["lines"][-40:]))
    assert len(res["retrieved_by_task"]) == PARTITIONS, res["retrieved_by_task"]
    assert any(f"{role} (" in ln and "retrieved" in ln for ln in res["lines"])


# ---- the tests ---------------------------------------------------------------------------------
def test_cluster_runs_both_languages_and_logs_reach_the_driver(cluster, executor_python,
                                                                tmp_path):
    state = cluster.master_state()
    assert state["aliveworkers"] == 2 and state["cores"] == 2
    res = run_client({"master": cluster.url, "app": "workerbridge-cluster-test",
                      "conf": cluster_conf(cluster, executor_python, tmp_path),
                      "cases": ["python schema", "r inferred"], "log_filter": "workerbridge:"},
                     tmp_path / "client",
                     env={"PYSPARK_PYTHON": executor_python})
    for name, case in res["cases"].items():
        assert_case(case, name, python=executor_python)
    assert res["returncode"] == 0
    # the lines came from the executors' Workers, through the driver's Gateway
    lines = [ln for c in res["cases"].values() for ln in c["lines"]]
    assert any("Gateway" in ln and "accepted registration of Worker" in ln for ln in lines)
    # both executors took part
    work = {p.name for i in range(2) for p in (cluster.root / f"worker{i}" / "work").glob("app-*")}
    assert work, "no application directory in the workers' work dirs"
    used = [i for i in range(2) if list((cluster.root / f"worker{i}" / "work").glob("app-*/*"))]
    assert used == [0, 1], f"executors ran on workers {used}"


def test_cluster_skewed_executor_package_and_stderr_fallback(cluster, tmp_path):
    """An executor env with ANOTHER workerbridge (0.0.1): the job must still give the right
    rows (the shipped code is used) and something must say 'version'.

    Then, in the same application, the Gateway stops listening (as on a multi-host
    cluster, where executors cannot reach the driver's 127.0.0.1): the job still runs and
    the lines go to the executors' stderr, the file the README points to."""
    fake = tmp_path / "fake"
    (fake / "workerbridge").mkdir(parents=True)
    (fake / "workerbridge" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    python = bare_venv(tmp_path / "skewvenv", extra_paths=(str(fake),))
    v = probe(python, "import workerbridge; print(workerbridge.__version__)", tmp_path)
    assert v.stdout.strip() == "0.0.1", v.stderr
    res = run_client({"master": cluster.url, "app": "workerbridge-skew-test",
                      # a fresh Python worker per task: none holds an old connection
                      "conf": dict(cluster_conf(cluster, python, tmp_path),
                                   **{"spark.python.worker.reuse": "false"}),
                      "cases": ["python schema"], "log_filter": "",
                      "unreachable_gateway": True},
                     tmp_path / "client", env={"PYSPARK_PYTHON": python})
    for name, case in res["cases"].items():
        assert_case(case, name, python=python)
    # paths are left out: they hold the test's own name
    words = [w for c in res["cases"].values() for ln in c["lines"] for w in ln.split()
             if "/" not in w]
    assert re.search(r"\bversion\b", " ".join(words), re.I), \
        "no log line mentions the workerbridge version skew (0.0.1 on the executors)"

    unreachable = res["unreachable"]
    assert "error" not in unreachable, unreachable["error"]
    assert unreachable["rows"] == ROWS and unreachable["ids_ok"]
    assert not [ln for ln in unreachable["new_lines"] if "retrieved" in ln], \
        "lines reached a Gateway that was not listening"
    stderr = "\n".join(p.read_text(errors="replace") for p in
                       cluster.root.glob(f"worker*/work/{res['app_id']}/*/stderr"))
    assert "cannot reach the Gateway" in stderr and "lines go to stderr" in stderr
    fallback = [int(m.group(1)) for m in
                re.finditer(r"PyScript \(\d+\) retrieved (\d+) rows", stderr)]
    assert sum(fallback) == ROWS, fallback
