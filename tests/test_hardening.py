"""Hardening: another local user cannot plant code, stall or read a task; children end
with their task.  Each attack or fault is made to happen for real: another user is
``nobody`` (``setpriv --reuid=65534``), an old ``setpriv`` is a script first on PATH,
a killed Worker is a real process killed with SIGKILL.  Both children where it applies;
the leak check (conftest) runs after each test.

Not here: the Gateway's own defences and its log file (``test_logs``-side, issue 14),
an executor lost on the standalone cluster (``test_executor_loss.py``).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import psutil
import pyarrow as pa
import pytest

from workerbridge import R
from workerbridge.driver.closure import pack
from workerbridge.driver.gateway import Gateway
from workerbridge.task import bootstrap as _bootstrap
from workerbridge.task.runtime import Runtime
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.supervise import with_parent_death_signal
from workerbridge.task.worker import CHILD_MODULE, Worker
from workerbridge.wire import protocol as P
from workerbridge.wire.errors import ChildDiedError, LimitError, TaskError, TransportError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NOBODY_UID = 65534
SRC = str(Path(__file__).resolve().parents[1])
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="acting as nobody needs root")


def as_nobody(fn, *args, wait: bool = True):
    """``fn(*args)`` in a forked child that has become ``nobody``: its pid, or (when
    ``wait``) after it exited 0.  The child ends with os._exit, never returning here."""
    pid = os.fork()
    if pid == 0:                                           # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY_UID)
            os.setuid(NOBODY_UID)
            fn(*args)
            code = 0
        except BaseException:                              # noqa: BLE001
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    if not wait:
        return pid
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the nobody child failed (stderr above)"
    return pid


@pytest.fixture()
def shared_tmp():
    """A directory like /tmp (world-writable, sticky) that nobody can reach."""
    path = Path(tempfile.mkdtemp(prefix="wb-hardening-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def run_task(f, options=None, batches=None, spec_job=None, gw=None):
    """The Worker exactly as a task runs it, here on the driver: (batches, log lines)."""
    own = gw is None
    gw = gw or Gateway(log_path=None)
    try:
        runtime = Runtime.collect(isinstance(f, R))
        root = str(runtime.materialize())
        spec = TaskSpec(pack(f), runtime.digest, None, gw.address,
                        WorkerOptions(**(options or {})))
        if spec_job is not None:
            spec = TaskSpec(spec.closure, spec.runtime_digest, None, gw.address, spec.options,
                            job=spec_job)
        data = batches if batches is not None else pa.table({"x": list(range(20))}).to_batches()
        try:
            return list(Worker(spec, 3, "hard", root=root).run(data)), gw.lines(n=None)
        except TaskError as e:
            e.lines = gw.lines(n=None)
            raise
    finally:
        if own:
            gw.stop()


def gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def wait_file(path: Path, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


# ---- 1. the runtime directory ------------------------------------------------------------
PLANTED_PY = "open({marker!r}, 'w').write('planted code ran')\n"
PLANTED_R = "writeLines('planted code ran', {marker!r})\n"


def _plant(tmp: Path, how: str, lang: str, marker: Path) -> Path:
    """What another local user (nobody) leaves at our runtime's place before we run."""
    runtime = Runtime.collect(True)
    home = tmp / f"workerbridge-{os.getuid()}"
    target = home if how != "symlink" else tmp / "evil"
    code = dict(runtime.files)
    if lang == "python":
        code["workerbridge/__init__.py"] = PLANTED_PY.format(marker=str(marker)) + \
            code["workerbridge/__init__.py"]
    else:
        code["rscripts/child.R"] = PLANTED_R.format(marker=str(marker)) + code["rscripts/child.R"]

    def plant():
        os.umask(0)
        root = target / f"runtime-{runtime.digest}"
        for rel, text in code.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o777)
            (root / rel).write_text(text)
        target.chmod(0o777)
        if how == "symlink":
            os.symlink(target, home)

    as_nobody(plant)
    assert os.lstat(home).st_uid == NOBODY_UID
    return home


@needs_root
@pytest.mark.parametrize("lang", ["python", "r"])
@pytest.mark.parametrize("how", ["directory", "symlink"])
def test_planted_runtime_is_replaced_never_used(shared_tmp, tmp_path, monkeypatch, how, lang):
    """nobody creates our runtime's directory first, with code of their own in it: the
    task (here the driver's schema-inference path, the Worker on the driver) replaces it."""
    tmp = shared_tmp
    marker = tmp_path / "marker"
    home = _plant(tmp, how, lang, marker)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv(_bootstrap.HOME_ENV, raising=False)
    f = (lambda d: d) if lang == "python" else R("function(d) d")
    out, _ = run_task(f)
    assert pa.Table.from_batches(out).column("x").to_pylist() == list(range(20))
    assert not marker.exists(), "the planted code ran"
    st = os.lstat(home)
    assert st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o700
    for top, dirs, names in os.walk(home):
        for n in dirs + names:
            s = os.lstat(os.path.join(top, n))
            assert s.st_uid == os.getuid() and not s.st_mode & 0o077, (top, n, oct(s.st_mode))


@needs_root
def test_home_we_may_not_remove_gives_a_fresh_private_one(shared_tmp):
    """As nobody, with root's directory at nobody's place (which nobody may not remove
    from a sticky directory): a fresh mkdtemp directory; the planted one is never used."""
    planted = shared_tmp / f"workerbridge-{NOBODY_UID}"
    planted.mkdir()
    planted.chmod(0o777)
    result = shared_tmp / "result"
    result.mkdir()
    result.chmod(0o777)

    def lay_out():
        files = {"a.txt": "x"}
        root = _bootstrap.materialize(files, _bootstrap.content_digest(files), str(shared_tmp))
        (result / "root").write_text(root)

    as_nobody(lay_out)
    root = Path((result / "root").read_text())
    assert root.parent.parent == shared_tmp and root.parent != planted
    assert root.parent.name.startswith(f"workerbridge-{NOBODY_UID}-")
    assert (root / "a.txt").read_text() == "x" and not os.listdir(planted)
    st = os.lstat(root.parent)
    assert st.st_uid == NOBODY_UID and (st.st_mode & 0o777) == 0o700


def test_tampered_runtime_file_is_refused_and_laid_out_again(tmp_path):
    runtime = Runtime.collect(True)
    root = Path(runtime.materialize(str(tmp_path)))
    child = root / "rscripts" / "child.R"
    child.write_text(child.read_text() + "\nsystem('echo tampered')\n")
    assert _bootstrap.check_runtime(str(root), runtime.digest) is not None
    again = Path(runtime.materialize(str(tmp_path)))
    assert again == root and child.read_text() == runtime.files["rscripts/child.R"]
    with pytest.raises(RuntimeError, match="missing or failed its check"):
        (root / "rscripts" / "extra.R").write_text("1")
        _bootstrap.materialize({}, runtime.digest, str(tmp_path))


def test_runtime_changed_after_its_check_is_checked_again(tmp_path):
    """A process skips re-hashing a runtime it verified only while nothing in it
    changed: a same-size rewrite with its mtime put back still changes its ctime,
    and the next use lays the file out again."""
    runtime = Runtime.collect(True)
    root = Path(runtime.materialize(str(tmp_path)))
    assert Path(runtime.materialize(str(tmp_path))) == root        # verified, remembered
    child = root / "rscripts" / "child.R"
    text, st = child.read_text(), child.stat()
    child.write_text(text.replace("wb_child_main()", "q('no'); main()", 1))
    assert child.stat().st_size == st.st_size
    os.utime(child, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert Path(runtime.materialize(str(tmp_path))) == root
    assert child.read_text() == runtime.files["rscripts/child.R"]


# ---- 3. setpriv without --pdeathsig --------------------------------------------------------
OLD_SETPRIV = """#!/bin/sh
# util-linux 2.32 (RHEL 8, Amazon Linux 2): no --pdeathsig
echo "$@" >> {log}
for a in "$@"; do
  case "$a" in --pdeathsig*) echo "setpriv: unrecognized option '--pdeathsig'" >&2; exit 1;; esac
done
exec {real} "$@"
"""

WORKER_SCRIPT = """
import sys, time
sys.path.insert(0, {src!r})
import pyarrow as pa
from workerbridge import R
from workerbridge.driver.closure import pack
from workerbridge.task.runtime import Runtime
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker
lang, opts = sys.argv[1], {opts!r}
def run(code):
    f = eval(code) if lang == "python" else R(code)
    runtime = Runtime.collect(lang == "r")
    spec = TaskSpec(pack(f), runtime.digest, None, None, WorkerOptions(**opts))
    worker = Worker(spec, 0, "t", root=str(runtime.materialize()))
    return list(worker.run(pa.table({{"x": [1, 2]}}).to_batches()))
run("lambda d: d" if lang == "python" else "function(d) d")
print("first task done", flush=True)
run("lambda d: __import__('time').sleep(120)" if lang == "python"
    else "function(d) {{ Sys.sleep(120); d }}")
"""


def _old_setpriv(tmp_path: Path) -> tuple[Path, Path]:
    bindir, log = tmp_path / "oldbin", tmp_path / "setpriv.log"
    bindir.mkdir()
    fake = bindir / "setpriv"
    fake.write_text(OLD_SETPRIV.format(log=log, real=subprocess.check_output(
        ["sh", "-c", "command -v setpriv"], text=True).strip()))
    fake.chmod(0o755)
    return bindir, log


def test_old_setpriv_falls_back_to_a_launcher_that_sets_the_signal(tmp_path, monkeypatch):
    bindir, log = _old_setpriv(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    argv = with_parent_death_signal([sys.executable, "-c", (
        "import ctypes; v = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")])
    assert str(bindir) not in " ".join(argv), argv             # the fake was probed, not used
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == str(signal.SIGKILL.value), out
    assert "--pdeathsig" in log.read_text()


def _child_of(parent: int, timeout: float = 60) -> psutil.Process:
    """The PyScript / RScript process below ``parent`` (by its command line)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in psutil.Process(parent).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if (CHILD_MODULE in cmd and "-c" in p.cmdline()[1:2]) or \
                        (p.name() == "R" and "child.R" in cmd):
                    return p
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError("no child appeared")


@pytest.mark.parametrize("lang", ["python", "r"])
def test_children_start_and_die_with_their_worker_under_an_old_setpriv(tmp_path, lang):
    """util-linux < 2.33: children still start (setpriv probed once), and a Worker killed
    with SIGKILL takes its child along."""
    bindir, log = _old_setpriv(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT.format(src=SRC, opts={}))
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    _kill_worker_mid_closure(script, lang, env, direct_child=True)   # the launcher exec'd
    assert log.read_text().count("--pdeathsig") == 1, log.read_text()   # probed once


def _kill_worker_mid_closure(script: Path, lang: str, env: dict, direct_child: bool) -> None:
    """Run WORKER_SCRIPT, SIGKILL it while its second closure sleeps; the child must go."""
    proc = subprocess.Popen([sys.executable, str(script), lang], env=env, cwd=str(script.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "first task done"
        child = _child_of(proc.pid)
        assert (child.ppid() == proc.pid) == direct_child, child.ppid()
        time.sleep(1.0)                                       # inside the closure's sleep
        proc.kill()
        proc.wait(10)
        assert gone(child.pid, 10), "the child outlived its SIGKILLed Worker"
    finally:
        proc.kill()
        proc.wait(10)


# ---- 5. stdin EOF while a long closure runs (no parent-death signal reaches the child) ----
DETACHING_WRAPPER = """#!/bin/sh
# the child runs under this shell, which alone gets the parent-death signal
exec 3<&0
{exe} "$@" 0<&3 3<&- &
wait
"""


@pytest.mark.parametrize("lang", ["python", "r"])
def test_child_ends_on_stdin_eof_during_a_long_closure(tmp_path, lang):
    wrapper = tmp_path / "wrapper"
    exe = sys.executable if lang == "python" else "Rscript"
    wrapper.write_text(DETACHING_WRAPPER.format(exe=exe))
    wrapper.chmod(0o755)
    opts = {"python": str(wrapper)} if lang == "python" else {"rscript": str(wrapper)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT.format(src=SRC, opts=opts))
    _kill_worker_mid_closure(script, lang, dict(os.environ), direct_child=False)


# ---- 4. grandchildren that were reparented -------------------------------------------------
def py_orphan_and_exit(d):
    import os
    import subprocess
    subprocess.run(f"sleep 300 & echo $! > {os.environ['WB_PIDFILE']}", shell=True)
    os._exit(3)


def py_multiprocessing_and_exit(d):
    import multiprocessing
    import os
    import time
    p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(300,))
    p.start()
    open(os.environ["WB_PIDFILE"], "w").write(str(p.pid))
    os._exit(3)


def py_orphan_eats_memory(d):
    import subprocess
    import sys
    import time
    subprocess.run(f"{sys.executable} -c 'b = bytearray(600 * 2**20); import time; "
                   "time.sleep(300)' &", shell=True)
    time.sleep(120)


GRANDCHILD = {
    ("python", "system"): py_orphan_and_exit,
    ("python", "fork"): py_multiprocessing_and_exit,
    ("r", "system"): "function(d) { system(paste0('sleep 300 & echo $! > ', "
                     "Sys.getenv('WB_PIDFILE'))); quit(save = 'no', status = 3L) }",
    ("r", "fork"): "function(d) { p <- parallel::mcparallel(Sys.sleep(300)); "
                   "writeLines(as.character(p$pid), Sys.getenv('WB_PIDFILE')); "
                   "tools::pskill(Sys.getpid(), 9L) }",
}


@pytest.mark.parametrize("lang,how", sorted(GRANDCHILD))
def test_reparented_grandchildren_end_with_the_task(tmp_path, lang, how):
    pidfile = tmp_path / "grandchild.pid"
    f = GRANDCHILD[lang, how]
    f = f if lang == "python" else R(f)
    with pytest.raises(ChildDiedError):
        run_task(f, {"env": {"WB_PIDFILE": str(pidfile)}})
    pid = int(wait_file(pidfile))
    assert gone(pid, 10), f"grandchild {pid} ({how}) outlived its task"


@pytest.mark.parametrize("lang", ["python", "r"])
def test_reparented_grandchild_counts_toward_memory_limit(lang):
    f = py_orphan_eats_memory if lang == "python" else R(
        "function(d) { system(\"python3 -c 'b = bytearray(600 * 2**20); import time; "
        "time.sleep(300)' &\"); Sys.sleep(120); d }")
    t0 = time.monotonic()
    with pytest.raises(LimitError, match="memory_limit of 400.0 MB breached"):
        run_task(f, {"memory_limit": 400 * 2**20})
    assert time.monotonic() - t0 < 60


# ---- 6. a huge log line --------------------------------------------------------------------
def py_log_big(d):
    import workerbridge
    workerbridge.log("a" * 300_000)
    workerbridge.log("b" * 3_000_000, "WARN")
    return d


@pytest.mark.parametrize("lang", ["python", "r"])
def test_log_lines_are_capped_in_the_worker(lang):
    f = py_log_big if lang == "python" else R(
        "function(d) { worker_log(strrep('a', 300000)); worker_log(strrep('b', 3000000)); d }")
    _, lines = run_task(f)
    big = [ln for ln in lines if "log line truncated" in ln]
    assert len(big) == 2, [ln[:100] for ln in lines]
    for ln, letter in zip(big, "ab"):
        assert len(ln.encode()) < P.LOG_LINE_MAX_BYTES + 200
        assert letter * 1000 in ln and "Closure" in ln
    assert big[0].endswith("… [log line truncated: 300000 bytes in all]")
    total = int(big[1].rsplit("truncated: ", 1)[1].split()[0])
    assert 3_000_000 < total < 3_000_200
    assert " WARN " in big[1] or lang == "r"          # R's worker_log has no level


# ---- 7. silent local connections ------------------------------------------------------------
def _hold_silent_connections(port: int, n: int, ready_fd: int) -> None:
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    os.write(ready_fd, b"connected")
    time.sleep(40)
    del held


@needs_root
def test_silent_connections_from_another_user_do_not_stall_the_accept(tmp_path):
    """nobody opens 30 silent connections to the backend port before the child connects:
    each waited 10 s in turn before (30 x 10 s > the 60 s connect timeout)."""
    slow = tmp_path / "slowpython"
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    gw = Gateway(log_path=None)
    attacker = None
    try:
        import threading
        box = {}
        t = threading.Thread(target=lambda: box.update(r=_try(run_task, lambda d: d,
                                                              {"python": str(slow)}, gw=gw)))
        t0 = time.monotonic()
        t.start()
        port = None
        while port is None and time.monotonic() - t0 < 30:
            port = next((int(ln.rsplit(" ", 1)[1]) for ln in gw.lines(n=None)
                         if "to connect to port" in ln), None)
            time.sleep(0.01)
        ready_r, ready_w = os.pipe()
        attacker = as_nobody(_hold_silent_connections, port, 30, ready_w, wait=False)
        os.close(ready_w)
        assert os.read(ready_r, 100) == b"connected"
        os.close(ready_r)
        t.join(60)
        assert not t.is_alive()
        ok, value = box["r"]
        assert ok, value
        assert time.monotonic() - t0 < 20
        assert any("refused" in ln and "backend connections in all" in ln or
                   "refused a backend connection" in ln for ln in gw.lines(n=None))
    finally:
        if attacker is not None:
            os.kill(attacker, signal.SIGKILL)
            os.waitpid(attacker, 0)
        gw.stop()


def _try(fn, *args, **kw):
    try:
        return True, fn(*args, **kw)
    except BaseException as e:  # noqa: BLE001
        return False, e


# ---- 8. an upstream error, and row counts ---------------------------------------------------
def _failing_input():
    yield pa.record_batch([pa.array(range(1000))], names=["x"])
    time.sleep(0.3)
    raise OSError("the source went away (on purpose)")


@pytest.mark.parametrize("lang", ["python", "r"])
def test_upstream_error_never_ends_the_child_input(lang):
    f = (lambda d: d) if lang == "python" else R("function(d) d")
    t0 = time.monotonic()
    with pytest.raises(TaskError, match="input failed upstream: OSError: the source went away") \
            as info:
        run_task(f, batches=_failing_input())
    assert isinstance(info.value.__cause__, OSError)
    assert not [ln for ln in info.value.lines if "applied closure" in ln], \
        "the child took part of the partition for all of it"
    assert time.monotonic() - t0 < 20


LYING_CHILD = """
import os, socket, sys
sys.path.insert(0, os.environ["WB_SRC"])
import pyarrow as pa
from workerbridge.wire import protocol as P
secret = sys.stdin.buffer.readline().strip()
s = socket.create_connection(("127.0.0.1", int(os.environ[P.ENV_PORT])))
P.send_frame(s, P.AUTH, secret)
P.send_json(s, P.HELLO, {"pid": os.getpid(), "protocol": P.PROTOCOL_VERSION})
r = s.makefile("rb")
P.expect(r, P.WELCOME)
P.expect(r, P.TASK); P.expect(r, P.CLOSURE); P.expect(r, P.INPUT)
table = pa.ipc.open_stream(r).read_all()
P.send_frame(s, P.OUTPUT)
out = s.makefile("wb")
with pa.ipc.new_stream(out, table.schema) as w:
    w.write_table(table)
out.flush()
P.send_json(s, P.DONE, {"rows_in": table.num_rows - 1, "rows_out": table.num_rows})
r.read()
"""


def test_child_that_took_fewer_rows_fails_the_task(tmp_path):
    body = tmp_path / "lying_child.py"
    body.write_text(LYING_CHILD)
    script = tmp_path / "fakepython"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {body}\n")
    script.chmod(0o755)
    with pytest.raises(TransportError, match="row counts disagree: the Worker sent 20 rows "
                                             "and PyScript took 19"):
        run_task(lambda d: d, {"python": str(script), "env": {"WB_SRC": SRC}})


# ---- 9. file descriptors above 1024 -----------------------------------------------------------
@pytest.mark.parametrize("lang", ["python", "r"])
def test_sockets_above_fd_1024(lang):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("the hard fd limit is below 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) >= 1024
        f = (lambda d: d) if lang == "python" else R("function(d) d")
        out, _ = run_task(f)
        assert pa.Table.from_batches(out).num_rows == 20
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---- 10. PYTHONPATH and the working directory ---------------------------------------------------
def py_uses_user_module(d):
    import os
    import sys
    import wb_user_module
    return d.assign(v=wb_user_module.VALUE, first=sys.path[0], cwd_in=os.getcwd() in sys.path)


def test_user_pythonpath_kept_and_cwd_not_on_sys_path(tmp_path, monkeypatch):
    lib = tmp_path / "userlib"
    lib.mkdir()
    (lib / "wb_user_module.py").write_text("VALUE = 41\n")
    cwd = tmp_path / "cwd"                       # a directory another user could write
    cwd.mkdir()
    marker = tmp_path / "marker"
    for name in ("pyarrow.py", "cloudpickle.py", "wb_user_module.py"):
        (cwd / name).write_text(f"open({str(marker)!r}, 'w').write('planted')\nVALUE = 0\n")
    monkeypatch.chdir(cwd)
    out, _ = run_task(py_uses_user_module, {"env": {"PYTHONPATH": str(lib)}})
    table = pa.Table.from_batches(out)
    assert set(table.column("v").to_pylist()) == {41}
    assert set(table.column("cwd_in").to_pylist()) == {False}
    assert not marker.exists()


# ---- 11. warm reuse between jobs ---------------------------------------------------------------
def py_leave_state(d):
    import os
    import sys
    global wb_counter
    wb_counter = globals().get("wb_counter", 0) + 1
    os.environ["WB_LEFT"] = "1"
    sys.path.append("/wb-left")
    os.chdir("/")
    return d.assign(n=wb_counter)


def py_look_at_state(d):
    import os
    import sys
    return d.assign(env=os.environ.get("WB_LEFT", ""), path="/wb-left" in sys.path,
                    cwd=os.getcwd())


R_LEAVE = ("function(d) { wb_counter <<- if (exists('wb_counter')) wb_counter + 1 else 1; "
           "options(wb.left = TRUE); Sys.setenv(WB_LEFT = '1'); setwd('/'); "
           "library(tools); d$n <- wb_counter; d }")
R_LOOK = ("function(d) { d$env <- Sys.getenv('WB_LEFT'); d$opt <- !is.null(getOption('wb.left')); "
          "d$attached <- 'package:tools' %in% search(); d$glob <- exists('wb_counter', "
          "envir = globalenv()); d$cwd <- getwd(); d }")


@pytest.mark.parametrize("lang", ["python", "r"])
def test_warm_child_does_not_carry_one_jobs_state_into_another(lang, tmp_path, monkeypatch):
    from workerbridge.task.pool import POOL
    monkeypatch.chdir(tmp_path)
    leave, look = (py_leave_state, py_look_at_state) if lang == "python" else \
        (R(R_LEAVE), R(R_LOOK))
    opts = {"reuse": True, "idle_timeout": 30}
    gw = Gateway(log_path=None)
    try:
        first, _ = run_task(leave, opts, spec_job="job-a", gw=gw)
        again, _ = run_task(leave, opts, spec_job="job-a", gw=gw)     # same job: kept
        other, _ = run_task(leave, opts, spec_job="job-b", gw=gw)     # same closure, new job
        seen, lines = run_task(look, opts, spec_job="job-c", gw=gw)
    finally:
        POOL.close_all()
        gw.stop()
    assert len([ln for ln in lines if "reused" in ln]) == 3, "the child was not reused"
    n = [pa.Table.from_batches(b).column("n").to_pylist()[0] for b in (first, again, other)]
    assert n == [1, 2, 1], n
    table = pa.Table.from_batches(seen).to_pylist()[0]
    assert table["env"] == "" and table["cwd"] == str(tmp_path)
    if lang == "python":
        assert table["path"] is False
    else:
        assert not table["opt"] and not table["attached"] and not table["glob"]
