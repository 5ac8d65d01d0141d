"""Spark Connect: ``spark_apply`` on a Connect DataFrame, against a real Connect server.

The server is started with pyspark's own ``sbin/start-connect-server.sh`` (``--master
local[2]``, gRPC bound to 127.0.0.1 on a free port; its Python workers run a venv
WITHOUT workerbridge).  The client runs in a subprocess (the test process holds a
classic SparkContext; mixing the two in one process is fragile); the Gateway lives in
that client process, so ``spark_log`` works there.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from workerbridge.driver import compat

from test_cluster import executor_python  # noqa: F401 - a fixture, shared
from test_cluster import (DRIVER_PYTHON, PARTITIONS, ROWS, assert_case,
                          clean_env, free_port, processes_under, run_client, spark_home,
                          stop_tree)

pytestmark = pytest.mark.connect

CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
# pyspark 3.5 ships no Connect server: its client is tested against the server of a
# pyspark 4.x interpreter named here (its workers run that interpreter too).
SERVER_PYTHON_ENV = "WORKERBRIDGE_TEST_CONNECT_SERVER_PYTHON"
ALL_CASES = ["python schema", "python inferred", "r schema", "r inferred"]


def _connect_deps() -> bool:
    try:
        import google.protobuf  # noqa: F401
        import grpc  # noqa: F401
        import grpc_status  # noqa: F401
        if compat.is_spark4():
            import zstandard  # noqa: F401 - not needed by the 3.5 client
    except ImportError:
        return False
    return True


if not _connect_deps():
    pytest.skip("Spark Connect client deps missing: pip install -e '.[connect]'",
                allow_module_level=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server_python(request) -> str:
    """The Python of the server's workers: a venv without workerbridge, or the
    interpreter named by ``WORKERBRIDGE_TEST_CONNECT_SERVER_PYTHON``."""
    return os.environ.get(SERVER_PYTHON_ENV) or request.getfixturevalue("executor_python")


def _server_home(python: str) -> str:
    if not os.environ.get(SERVER_PYTHON_ENV):
        return spark_home()
    out = subprocess.run([python, "-c", "import os, pyspark; print(os.path.dirname("
                          "os.path.abspath(pyspark.__file__)))"], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory, server_python):
    root = tmp_path_factory.mktemp("connect")
    port = free_port()
    logs, pids = root / "logs", root / "pids"
    logs.mkdir()
    pids.mkdir()
    ident = f"wbtest{os.getpid()}"
    # The server's Python workers: PYSPARK_PYTHON from its environment (it ignores
    # spark.pyspark.python).
    home = _server_home(server_python)
    env = clean_env(SPARK_LOG_DIR=str(logs), SPARK_PID_DIR=str(pids), SPARK_IDENT_STRING=ident,
                    PYSPARK_PYTHON=server_python, SPARK_HOME=home)
    sbin = Path(home) / "sbin"
    if not (sbin / "start-connect-server.sh").exists():
        pytest.skip(f"this pyspark ({home}) ships no Connect server; set {SERVER_PYTHON_ENV} "
                    "to a Python with pyspark 4.x")
    cmd = [str(sbin / "start-connect-server.sh"), "--master", "local[2]",
           "--conf", f"spark.connect.grpc.binding.port={port}",
           "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
           "--conf", "spark.driver.host=127.0.0.1",
           "--conf", "spark.driver.bindAddress=127.0.0.1",
           "--conf", "spark.ui.enabled=false",
           "--conf", f"spark.local.dir={root / 'local'}",
           "--conf", "spark.task.maxFailures=1"]
    started = subprocess.run(cmd, cwd=str(root), env=env, capture_output=True, text=True,
                             timeout=60)
    pidfile = pids / f"spark-{ident}-{CLASS}-1.pid"      # written by spark-daemon.sh

    def stop() -> list:
        """stop-connect-server.sh, then by pid: the server and every process below it."""
        procs = []
        if pidfile.exists():                 # the stop script removes it: read it first
            try:
                server = psutil.Process(int(pidfile.read_text().split()[0]))
                procs = [server] + server.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        subprocess.run([str(sbin / "stop-connect-server.sh")], cwd=str(root), env=env,
                       capture_output=True, timeout=60)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            stop_tree(p.pid)
        return [p.pid for p in alive if p.is_running()]

    try:
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 90
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pid = int(pidfile.read_text().split()[0])
        while time.monotonic() < deadline:
            assert psutil.pid_exists(pid), "the Connect server exited:\n" + (
                next(iter(logs.glob("*.out"))).read_text(errors="replace")[-3000:])
            log = next(iter(logs.glob("*.out")), None)
            if _listening(port) and log and "Spark Connect server started" in \
                    log.read_text(errors="replace"):
                break
            time.sleep(0.25)
        else:
            raise RuntimeError("the Connect server did not start within 90 s")
    except BaseException:
        stop()
        raise
    yield {"url": f"sc://127.0.0.1:{port}", "pid": pid, "root": root}
    pid_left = stop()
    deadline = time.monotonic() + 15
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    stray = processes_under(root)
    assert not pid_left and not psutil.pid_exists(pid) and not stray, \
        f"Connect server processes outlived teardown: {pid_left} {stray}"


def _check(res: dict, python: str, cases: list) -> None:
    assert res["session"].startswith("pyspark.sql.connect"), res["session"]
    assert sorted(res["cases"]) == sorted(cases)
    for name, case in res["cases"].items():
        assert_case(case, name, python=python)
    # spark_log works for a Connect session: the Gateway is in the client process
    lines = [ln for c in res["cases"].values() for ln in c["lines"]]
    assert any("Gateway" in ln and "accepted registration of Worker" in ln for ln in lines)
    assert res["returncode"] == 0


def test_connect_server_both_languages(connect_server, server_python, tmp_path):
    res = run_client({"remote": connect_server["url"], "app": "workerbridge-connect-test",
                      "conf": {"spark.workerbridge.reuse": "false"}, "cases": ALL_CASES,
                      "extras": True, "log_filter": "workerbridge:"}, tmp_path / "client")
    _check(res, server_python, ALL_CASES)
    _check_extras(res["extras"], connect_server["root"])


def _check_extras(ex: dict, server_root: Path) -> None:
    errors = {k: v for k, v in ex.items() if isinstance(v, str) and v.startswith("ERROR")}
    assert not errors, "\n".join(f"{k}: {v}" for k, v in errors.items())
    assert ex["group_by"] == [[0, 3334], [1, 3333], [2, 3333]]
    assert ex["list"] == [2500] * PARTITIONS
    assert ex["barrier"] == [[0, 2], [1, 2]]
    assert ex["struct schema"] == ex["arrow schema"] == [["id", "bigint"]]
    assert ex["r context"] == [7]
    assert ex["spark_log without spark"] > 0          # the active Connect session's Gateway
    # the Gateway's log file is on the client, not in the server's spark.local.dir
    assert ex["log_path"].startswith(ex["tempdir"]) and "connect-" in ex["log_path"]
    assert not ex["log_path"].startswith(str(server_root))


def test_connect_local_remote(executor_python, tmp_path):
    """``SparkSession.builder.remote("local[2]")``: pyspark starts a Connect server in the
    client's own JVM."""
    if not compat.is_spark4():
        pytest.skip("pyspark 3.5 ships no Connect server jar for remote('local')")
    cases = ["python inferred", "r schema"]
    res = run_client({"remote": "local[2]", "app": "workerbridge-connect-local",
                      "conf": {"spark.workerbridge.reuse": "false",
                               "spark.driver.host": "127.0.0.1",
                               "spark.driver.bindAddress": "127.0.0.1",
                               "spark.ui.enabled": "false",
                               "spark.local.dir": str(tmp_path / "local")},
                      "cases": cases, "log_filter": "workerbridge:"},
                     tmp_path / "client", env={"PYSPARK_PYTHON": executor_python})
    _check(res, executor_python, cases)
    assert len(res["cases"]["r schema"]["retrieved_by_task"]) == PARTITIONS


def test_connect_client_no_worker_reaches_gets_lines_from_spark(connect_server, tmp_path):
    """The case no Gateway can serve: the client's Gateway stops listening (as a client
    behind NAT), the session has Spark's Python worker logging on (Spark 4.1+), and
    spark_log on the client still holds every task's lines, from Spark's table, once."""
    res = run_client({"remote": connect_server["url"], "app": "workerbridge-connect-nogw",
                      "conf": {"spark.workerbridge.reuse": "false",
                               "spark.sql.pyspark.worker.logging.enabled": "true"},
                      "cases": [], "unreachable_gateway": True}, tmp_path / "client")
    got = res["unreachable"]
    assert "error" not in got, got["error"]
    assert got["rows"] == ROWS and got["ids_ok"]
    lines = got["new_lines"]
    rows = {m.group(1): int(m.group(2)) for ln in lines
            for m in [re.search(r"PyScript \((\d+)\) retrieved (\d+) rows", ln)] if m}
    assert sum(rows.values()) == ROWS and len(rows) == PARTITIONS, lines[-30:]
    assert len(lines) == len(set(lines)), "a line shown twice"
