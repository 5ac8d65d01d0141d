"""A second network host on this machine: a Linux network namespace joined by a veth pair.

The standalone master and the driver stay in the root namespace on the veth address;
a Spark Worker (and its executors) runs inside the namespace, where 127.0.0.1 is its
own.  ``TwoHosts`` makes the namespace (named ``wbtest-<pid>-<tag>``, so parallel runs
cannot clash) and deletes it by name; every process it starts is ended by pid.  Also
an address on the driver's side that the namespace has no route to (``unroutable``).

Needs root and ``ip`` (iproute2); :func:`skip_reason` says why not, for pytest.skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
import json
from pathlib import Path
from typing import Optional

from test_cluster import clean_env, free_port, spark_home, stop_tree, wait_for


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def skip_reason() -> Optional[str]:
    """Why a namespace cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2) to make a network namespace"
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    probe = f"wbtest-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """Root side ``10.213.N.1``, namespace side ``10.213.N.2``; ``unroutable``
    (``10.214.N.1``, on the root side) cannot be reached from the namespace."""

    def __init__(self, root: Path, tag: str = "a"):
        n = os.getpid() % 250
        self.ns = f"wbtest-{os.getpid()}-{tag}"
        self.veth = f"wb{os.getpid()}{tag}"[:15]
        self.peer = f"wn{os.getpid()}{tag}"[:15]
        self.driver_ip, self.other_ip = f"10.213.{n}.1", f"10.213.{n}.2"
        self.unroutable = f"10.214.{n}.1"
        self.root = root
        self.procs: list = []
        self.logs: list = []
        self.port = self.ui_port = 0

    # ---- the network ---------------------------------------------------------------
    def make(self) -> "TwoHosts":
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer)
        _ip("link", "set", self.peer, "netns", self.ns)
        _ip("addr", "add", f"{self.driver_ip}/24", "dev", self.veth)
        _ip("addr", "add", f"{self.unroutable}/32", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        for args in (("addr", "add", f"{self.other_ip}/24", "dev", self.peer),
                     ("link", "set", self.peer, "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", self.ns, "ip", *args)
        return self

    def delete(self) -> None:
        _ip("link", "del", self.veth, check=False)     # takes its peer along
        _ip("netns", "del", self.ns, check=False)

    def exists(self) -> bool:
        return self.ns in _ip("netns", "list", check=False).stdout.split()

    # ---- Spark -------------------------------------------------------------------------
    def _spawn(self, name: str, args: list, env: dict, netns: bool) -> subprocess.Popen:
        logdir = self.root / name
        logdir.mkdir(parents=True, exist_ok=True)
        log = logdir / "out.log"
        argv = [os.path.join(spark_home(), "bin", "spark-class"), *args]
        if netns:
            argv = ["ip", "netns", "exec", self.ns, *argv]      # ip execs the command
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=str(logdir), env=clean_env(
                SPARK_LOG_DIR=str(logdir), **env), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def master_state(self) -> dict:
        url = f"http://{self.driver_ip}:{self.ui_port}/json/"
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)

    @property
    def url(self) -> str:
        return f"spark://{self.driver_ip}:{self.port}"

    def start_spark(self, cores: int = 2) -> "TwoHosts":
        """The master here, one Worker with ``cores`` cores on the other host."""
        self.port, self.ui_port = free_port(), free_port()
        self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", self.driver_ip,
                               "--port", str(self.port), "--webui-port", str(self.ui_port)],
                    {"SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
                     "SPARK_LOCAL_IP": self.driver_ip}, netns=False)
        wait_for("master", lambda: self.master_state().get("status") == "ALIVE",
                 self.procs, logs=self.logs)
        work = self.root / "worker" / "work"
        work.mkdir(parents=True, exist_ok=True)
        self._spawn("worker", ["org.apache.spark.deploy.worker.Worker", "--host", self.other_ip,
                               "--cores", str(cores), "--memory", "2g", "--webui-port",
                               str(free_port()), "--work-dir", str(work), self.url],
                    {"SPARK_WORKER_DIR": str(work), "SPARK_LOCAL_IP": self.other_ip}, netns=True)
        wait_for("worker registered", lambda: self.master_state().get("aliveworkers") == 1,
                 self.procs, logs=self.logs)
        return self

    def executor_stderr(self, app_id: str) -> str:
        return "\n".join(p.read_text(errors="replace") for p in
                         (self.root / "worker" / "work").glob(f"{app_id}/*/stderr"))

    def stop(self) -> list:
        left = []
        for proc in reversed(self.procs):
            left += stop_tree(proc.pid)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return left

    def conf(self, executor_python: str, tmp: Path, **extra: str) -> dict:
        return {
            "spark.pyspark.python": executor_python,
            "spark.executorEnv.PYSPARK_PYTHON": executor_python,
            "spark.driver.host": self.driver_ip,
            "spark.driver.bindAddress": self.driver_ip,
            "spark.executor.cores": "1",
            "spark.cores.max": "2",
            "spark.executor.memory": "768m",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.local.dir": str(tmp / "local"),
            "spark.task.maxFailures": "1",
            **extra,
        }
