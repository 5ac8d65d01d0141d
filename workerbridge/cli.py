"""The ``workerbridge`` command: ``doctor`` checks a machine, ``logs`` reads a Gateway log.

Covers: argument parsing, the checks of ``doctor`` (each a function returning
a :class:`Check`), and reading, following and drawing a log file.  Does not
cover: the timeline's drawing (``diagnostics.timeline``) or the log format
(``wire.logline``).  The layers below are imported inside the commands, not at
the top: ``doctor`` must run, and report, on a machine that lacks pyarrow or
pyspark.

    workerbridge doctor [--rscript PATH] [--python PATH] [--no-spark]
    workerbridge logs [--filter X] [--follow] [--path FILE] [-n N] [--timeline out.html|out.png]

>>> main(["logs", "--path", "/nonexistent/workerbridge-x.log"])
workerbridge logs: no such log file: /nonexistent/workerbridge-x.log
2
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

from .driver import compat
from .driver.privatefiles import open_owned
from .wire.errors import R_INSTALL_HINT

PY_PACKAGES = ("pyspark", "pyarrow", "pandas", "cloudpickle", "psutil")
MIN_JAVA = 17                      # when pyspark is missing: what Spark 3.5 and 4.x share


@dataclass
class Check:
    ok: bool
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """One line, as ``ok      what: detail`` or ``problem what: detail -> fix: how``."""
        if self.ok:
            return f"ok      {self.what}: {self.detail}"
        return f"problem {self.what}: {self.detail} -> fix: {self.fix}"


def _one_line(text: str) -> str:
    return " | ".join(ln.strip() for ln in str(text).strip().splitlines() if ln.strip())


# ---- doctor ------------------------------------------------------------------------------
def check_java() -> Check:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    fix = (f"install Java {MIN_JAVA}+ (Debian: apt-get install openjdk-17-jre-headless) "
           "and put it on PATH or set JAVA_HOME")
    if not java or not os.path.exists(java):
        return Check(False, "java", f"not found ({'JAVA_HOME=' + home if home else 'PATH'})", fix)
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(False, "java", f"{java} -version failed: {e}", fix)
    text = out.stderr + out.stdout
    m = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not m:
        return Check(False, "java", f"cannot read the version from {java} -version", fix)
    major = int(m.group(2)) if m.group(1) == "1" else int(m.group(1))
    version = text.splitlines()[0].strip()
    return _java_for_pyspark(major, f"{version} at {java}", fix)


def _java_for_pyspark(major: int, found: str, fix: str) -> Check:
    """Does Java ``major`` suit the installed pyspark (its line's supported Javas)?"""
    try:
        text = metadata.version("pyspark")
    except metadata.PackageNotFoundError:
        ok = major >= MIN_JAVA
        return Check(ok, "java", f"{found}; pyspark is not installed (Spark 3.5 and 4.x both "
                                 f"run on Java {MIN_JAVA})", fix)
    majors = compat.java_majors(compat.parse_version(text))
    wanted = "/".join(map(str, majors)) or "unknown"
    if major not in majors:
        return Check(False, "java", f"{found} does not suit pyspark {text} (it runs on Java "
                                    f"{wanted})",
                     f"install Java 17 (Debian: apt-get install openjdk-17-jre-headless) and "
                     "put it on PATH or set JAVA_HOME")
    return Check(True, "java", f"{found} suits pyspark {text} (Java {wanted})")


def check_python_packages() -> list[Check]:
    out = []
    for name in PY_PACKAGES:
        try:
            out.append(_check_version(name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append(Check(False, name, f"not installed in {sys.executable}",
                             f"{sys.executable} -m pip install {name}"))
    return out


def _check_version(name: str, version: str) -> Check:
    if name == "pyspark" and compat.parse_version(version)[:2] < compat.MIN_PYSPARK:
        oldest = ".".join(map(str, compat.MIN_PYSPARK))
        return Check(False, name, f"{version} is older than {oldest}, the oldest supported",
                     f"{sys.executable} -m pip install 'pyspark>={oldest},<5'")
    return Check(True, name, version)


def check_rscript(rscript: str) -> tuple[Check, Optional[str]]:
    exe = shutil.which(rscript)
    fix = (f"{R_INSTALL_HINT}, or pass --rscript PATH "
           "(spark_apply: rscript= or spark.workerbridge.rscript)")
    if exe is None:
        return Check(False, "Rscript", f"not found as {rscript!r}", fix), None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(False, "Rscript", f"{exe} --version failed: {e}", fix), None
    m = re.search(r"version (\d+\.\d+\.\d+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        return Check(False, "Rscript", f"{exe} --version said: {(out.stdout + out.stderr)[-200:]}",
                     fix), None
    return Check(True, "Rscript", f"R {m.group(1)} at {exe}"), exe


_R_ROUND_TRIP = """
args <- commandArgs(trailingOnly = TRUE)
source(file.path(args[1], "arrow_ipc.R"))
d <- arrow_read_stream(args[2])
con <- file(args[3], "wb")
arrow_write_stream(d, con)
close(con)
cat(nrow(d), "rows,", ncol(d), "columns\\n")
"""


def check_r_arrow(exe: str) -> Check:
    """A tiny Arrow stream, pyarrow -> R reader -> R writer -> pyarrow, compared."""
    import pyarrow as pa
    from .task.runtime import r_scripts_dir
    what = "R Arrow round trip"
    try:
        rdir = r_scripts_dir()
    except FileNotFoundError as e:
        return Check(False, what, str(e), "reinstall workerbridge")
    table = pa.table({"i": pa.array([1, None, 3], pa.int32()), "d": [1.5, None, -2.0],
                      "s": ["a", None, "ü"], "b": [True, False, None]})
    with tempfile.TemporaryDirectory(prefix="workerbridge-doctor-") as tmp:
        src, back = os.path.join(tmp, "in.arrows"), os.path.join(tmp, "out.arrows")
        with pa.OSFile(src, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        try:
            out = subprocess.run([exe, "--vanilla", "-e", _R_ROUND_TRIP, str(rdir),
                                  src, back], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return Check(False, what, "Rscript took over 120 s", "check that R starts quickly")
        if out.returncode != 0:
            return Check(False, what, f"R failed: {_one_line(out.stderr)[-300:]}",
                         f"check {rdir / 'arrow_ipc.R'} runs in this R")
        with pa.OSFile(back, "rb") as f:
            got = pa.ipc.open_stream(f).read_all()
    if not got.equals(table):
        return Check(False, what, f"R wrote back {got.schema} {got.to_pydict()}",
                     "a bug in rscripts/arrow_ipc.R; please report it")
    return Check(True, what, f"{table.num_rows} rows × {table.num_columns} columns came back equal")


def _run_child(closure, with_r: bool, options) -> tuple[list, list[str]]:
    import pyarrow as pa
    from .driver.gateway import Gateway
    from .task.runtime import Runtime
    from .task.spec import TaskSpec
    from .task.worker import Worker
    gw = Gateway(log_path=None)
    try:
        runtime = Runtime.collect(with_r)
        spec = TaskSpec(closure, runtime.digest, None, gw.address, options)
        worker = Worker(spec, 0, os.getpid(), root=str(runtime.materialize()))
        batches = list(worker.run(pa.table({"x": [1.0, 2.0, 3.0]}).to_batches()))
        return batches, gw.lines(n=None)
    finally:
        gw.stop()


def check_child(language: str, python: Optional[str], rscript: str) -> Check:
    """The real child (PyScript or RScript) run by a real Worker on a 3-row table."""
    import pyarrow as pa
    from .driver.closure import R, pack
    from .task.spec import WorkerOptions
    role = "RScript" if language == "R" else "PyScript"
    what = f"{role} child"
    options = WorkerOptions(python=python, rscript=rscript, connect_timeout=60.0)
    f = R("function(d) { d$y <- d$x * 2; d }") if language == "R" else \
        (lambda d: d.assign(y=d.x * 2))
    started = time.monotonic()
    try:
        batches, _ = _run_child(pack(f), language == "R", options)
    except Exception as e:                                   # noqa: BLE001 - reported
        fix = getattr(e, "hint", None) or ("pass --python an interpreter with pyarrow, pandas "
                                            "and cloudpickle" if language != "R" else
                                            "see the error; check the R installation")
        return Check(False, what, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", fix)
    got = pa.Table.from_batches(batches).column("y").to_pylist() if batches else []
    if got != [2.0, 4.0, 6.0]:
        return Check(False, what, f"returned {got}, expected [2.0, 4.0, 6.0]",
                     "a bug in the child; please report it")
    exe = rscript if language == "R" else (python or sys.executable)
    return Check(True, what, f"ran a closure over 3 rows with {exe} in "
                             f"{time.monotonic() - started:.1f} s")


def check_spark(python: Optional[str]) -> Check:
    """A local Spark (loopback only, no UI) starts and runs spark_apply; stopped after."""
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    os.environ.setdefault("PYSPARK_PYTHON", python or sys.executable)
    what = "local Spark"
    started = time.monotonic()
    spark = None
    try:
        from pyspark.sql import SparkSession
        spark = (SparkSession.builder.master("local[1]").appName("workerbridge-doctor")
                 .config("spark.ui.enabled", "false")
                 .config("spark.ui.showConsoleProgress", "false")
                 .config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1")
                 .getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        from .driver.api import spark_apply
        df = spark.range(0, 30, numPartitions=3)
        rows = spark_apply(df, lambda d: d.assign(y=d.id * 2), schema="id long, y long",
                           progress=False).count()
        if rows != 30:
            return Check(False, what, f"spark_apply returned {rows} rows, expected 30",
                         "a bug; please report it")
        return Check(True, what, f"Spark {spark.version} started and ran spark_apply over 3 "
                                 f"partitions in {time.monotonic() - started:.1f} s")
    except Exception as e:                                   # noqa: BLE001 - reported
        return Check(False, what, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                     "check Java (above) and that 127.0.0.1 is usable; run with --no-spark "
                     "to skip this check")
    finally:
        if spark is not None:
            spark.stop()


def doctor(args, out=None) -> int:
    out = out or sys.stdout
    problems = 0

    def report(check: Check) -> None:
        nonlocal problems
        problems += not check.ok
        check.detail = _one_line(check.detail)
        print(check.line(), file=out, flush=True)

    report(check_java())
    for c in check_python_packages():
        report(c)
    if args.python:
        report(check_python_interpreter(args.python))
    rcheck, exe = check_rscript(args.rscript)
    report(rcheck)
    if exe is not None:
        report(check_r_arrow(exe))
        report(check_child("R", args.python, exe))
    report(check_child("Python", args.python, args.rscript))
    if not args.no_spark:
        report(check_spark(args.python))
    print(f"{problems} problem{'s' if problems != 1 else ''} found", file=out)
    return 1 if problems else 0


def check_python_interpreter(python: str) -> Check:
    exe = shutil.which(python)
    what = "--python interpreter"
    if exe is None:
        return Check(False, what, f"not found: {python!r}", "give the path of a python executable")
    probe = ("import sys, importlib.metadata as m\n"
             "print(sys.version.split()[0], *[n + ' ' + m.version(n) for n in "
             "('pyarrow', 'pandas', 'cloudpickle')], sep=', ')")
    out = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return Check(False, what, f"{exe} lacks a package: {out.stderr.strip().splitlines()[-1]}",
                     f"{exe} -m pip install pyarrow pandas cloudpickle")
    return Check(True, what, f"{exe}: Python {out.stdout.strip()}")


# ---- logs ----------------------------------------------------------------------------------
def log_dirs() -> list[str]:
    """Where a session's Gateway writes by default: spark.local.dir (SPARK_LOCAL_DIRS) or
    the temp dir."""
    dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d]
    return dirs + [tempfile.gettempdir()]


def newest_log() -> Optional[str]:
    """The newest log file this user owns, in its private directory (or, from older
    releases, beside it); never a symlink or another user's file."""
    found = [p for d in log_dirs() for pattern in (
        os.path.join(d, f"workerbridge-{os.getuid()}", "workerbridge-*.log"),
        os.path.join(d, "workerbridge-*.log")) for p in glob.glob(pattern) if _owned(p)]
    return max(found, key=os.path.getmtime) if found else None


def _owned(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def _matches(line: str, text: Optional[str]) -> bool:
    return text is None or text in line


def logs(args, out=None) -> int:
    out = out or sys.stdout
    path = args.path or newest_log()
    if path is None:
        print(f"workerbridge logs: no workerbridge-*.log in {', '.join(log_dirs())}; "
              "pass --path FILE", file=out)
        return 2
    if not os.path.lexists(path):
        print(f"workerbridge logs: no such log file: {path}", file=out)
        return 2
    try:
        f = open_owned(path)
    except OSError as e:
        print(f"workerbridge logs: {e}", file=out)
        return 2
    with f:
        lines = [ln.rstrip("\n") for ln in f]
        position = f.tell()
    if args.timeline:
        from .diagnostics.tasks import events_from_log, tasks_from_events
        from .diagnostics.timeline import title_of, write_timeline
        tasks = tasks_from_events(events_from_log(lines))
        if args.filter:
            keep = {str(ln.split("(", 1)[1].split(")", 1)[0]) for ln in lines
                    if args.filter in ln and "(" in ln}
            tasks = [t for t in tasks if str(t.id) in keep]
        written = write_timeline(tasks, args.timeline,
                                 title=title_of(tasks) + " (log file: times to the second)")
        print(f"wrote a timeline of {len(tasks)} tasks from {path} to {written} "
              "(times to the second, as in the log file)", file=out)
        return 0
    shown = [ln for ln in lines if _matches(ln, args.filter)]
    if args.n:
        shown = shown[-args.n:]
    for ln in shown:
        print(ln, file=out)
    out.flush()
    if args.follow:
        _follow(path, position, args.filter, out, args.follow_seconds)
    return 0


def _follow(path: str, position: int, text: Optional[str], out, seconds: Optional[float]) -> None:
    """Print lines appended to ``path`` until interrupted (or ``seconds`` pass)."""
    end = None if seconds is None else time.monotonic() + seconds
    partial = ""
    try:
        with open_owned(path) as f:
            f.seek(position)
            while end is None or time.monotonic() < end:
                chunk = f.read()
                if not chunk:
                    time.sleep(0.1)
                    continue
                partial += chunk
                *complete, partial = partial.split("\n")
                for ln in complete:
                    if _matches(ln, text):
                        print(ln, file=out, flush=True)
    except KeyboardInterrupt:
        pass


# ---- entry point -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workerbridge",
                                description="Check a machine for workerbridge; read its logs.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="check Java, Python packages, R, both children, Spark")
    d.add_argument("--rscript", default="Rscript", help="the Rscript to check (default: Rscript)")
    d.add_argument("--python", default=None, help="the interpreter for Python children")
    d.add_argument("--no-spark", action="store_true", help="skip starting a local Spark")
    d.set_defaults(run=doctor)
    lg = sub.add_parser("logs", help="print (or follow, or draw) a Gateway log file")
    lg.add_argument("--path", help="the log file (default: the newest workerbridge-*.log)")
    lg.add_argument("--filter", help="only lines containing this text")
    lg.add_argument("-n", type=int, default=100, help="last N lines (0: all; default 100)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    lg.add_argument("--follow-seconds", type=float, default=None, help=argparse.SUPPRESS)
    lg.add_argument("--timeline", metavar="OUT", help="draw the tasks to OUT (.html or .png)")
    lg.set_defaults(run=logs)
    return p


def main(argv: Optional[list] = None) -> int:
    args = parser().parse_args(argv)
    run: Callable = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
