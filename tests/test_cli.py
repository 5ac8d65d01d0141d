"""The workerbridge command: doctor's checks on this machine, reading and following logs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pandas as pd

from workerbridge import cli, spark_apply
from workerbridge.driver.api import log_path


def command() -> list:
    """The installed console script, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "workerbridge")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "workerbridge.cli"]


def test_doctor_without_spark(capsys):
    assert cli.main(["doctor", "--no-spark"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "0 problems found"
    checks = {ln[8:].split(":", 1)[0]: ln for ln in lines[:-1]}
    for what in ("java", "pyspark", "pyarrow", "pandas", "cloudpickle", "psutil", "Rscript",
                 "R Arrow round trip", "RScript child", "PyScript child"):
        assert checks[what].startswith(f"ok      {what}: "), lines
    assert "local Spark" not in checks


def test_doctor_names_problems_and_fixes(capsys):
    assert cli.main(["doctor", "--no-spark", "--rscript", "/no/such/Rscript",
                     "--python", "/no/such/python"]) == 1
    out = capsys.readouterr().out
    problems = [ln for ln in out.splitlines() if ln.startswith("problem ")]
    assert {p.split(":", 1)[0] for p in problems} == {
        "problem Rscript", "problem --python interpreter", "problem PyScript child"}
    assert all(" -> fix: " in p for p in problems)
    assert "apt-get install r-base-core" in out and "3 problems found" in out


def test_doctor_starts_a_local_spark():
    out = subprocess.run(command() + ["doctor"], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1"))
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert any(ln.startswith("ok      local Spark: Spark ") for ln in out.stdout.splitlines())


def test_logs_filter_n_and_timeline(spark, capsys, tmp_path):
    df = spark.createDataFrame(pd.DataFrame({"x": range(20)})).repartition(2)
    assert spark_apply(df, lambda d: d, schema="x long").count() == 20
    path = log_path(spark)
    assert cli.main(["logs", "--path", path, "--filter", "PyScript", "-n", "4"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 4 and all("PyScript" in ln for ln in shown)
    assert shown[-1] in open(path).read().splitlines()
    out_html = tmp_path / "log.html"
    assert cli.main(["logs", "--path", path, "--timeline", str(out_html)]) == 0
    assert "times to the second" in capsys.readouterr().out
    assert open(out_html).read().count('<g class="task"') >= 2


def test_logs_defaults_to_the_newest_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SPARK_LOCAL_DIRS", raising=False)
    old, new = tmp_path / "workerbridge-app-old.log", tmp_path / "workerbridge-app-new.log"
    old.write_text("old line\n")
    new.write_text("new line 1\nnew line 2\n")
    os.utime(old, (time.time() + 100, time.time() + 100))
    assert cli.newest_log() == str(old)
    os.utime(new, (time.time() + 200, time.time() + 200))
    assert cli.main(["logs", "-n", "1"]) == 0
    assert capsys.readouterr().out == "new line 2\n"
    new.unlink(), old.unlink()
    assert cli.main(["logs"]) == 2
    assert "pass --path" in capsys.readouterr().out


def test_logs_follow_prints_new_lines(tmp_path):
    log = tmp_path / "workerbridge-app-f.log"
    log.write_text("before PyScript\n")
    proc = subprocess.Popen(command() + ["logs", "--path", str(log), "--filter", "PyScript",
                                         "--follow", "--follow-seconds", "4"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "before PyScript\n"
        with open(log, "a") as f:
            f.write("Worker line\nafter PyScript 1\n")
            f.flush()
            f.write("after PyScr")
            f.flush()
            time.sleep(0.3)
            f.write("ipt 2\n")
        assert proc.stdout.readline() == "after PyScript 1\n"
        assert proc.stdout.readline() == "after PyScript 2\n"
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""
    finally:
        proc.kill() if proc.poll() is None else None
        proc.stdout.close()
