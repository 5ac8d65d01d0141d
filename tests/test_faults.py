"""Fault injection: a table of crash cases, each made to happen for real, run
against both children, each asserting the error's type/message and a wall-clock
bound.  The autouse leak check (conftest) runs after every case."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time

import psutil
import pyarrow as pa
import pytest

from workerbridge import R, spark_apply
from workerbridge.driver.closure import pack
from workerbridge.wire.errors import BadInputError, ChildDiedError, ClosureError, LimitError, TransportError
from workerbridge.driver.gateway import Gateway
from wbtest import ROOT, RUNTIME
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker

from wbtest import child_processes

# The closures below are module-level functions; ship them by value, as users'
# own modules would have to be importable on the executors otherwise.
import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def py_raise(d):
    raise RuntimeError("ошибка ü — broken on purpose")


def py_exit(d):
    import os
    os._exit(3)


def py_segfault(d):
    import ctypes
    ctypes.string_at(0)


def py_hang(d):
    import time
    time.sleep(120)


def py_ignore_term_and_hang(d):
    import signal
    import time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)


def py_memory(d):
    import time
    block = bytearray(700 * 1024 * 1024)      # touched: bytearray zero-fills
    time.sleep(120)
    return d.assign(n=len(block))


def py_unconvertible(d):
    return object()


CASES = {
    # name: (python closure, R code, options, error type, message parts, seconds bound)
    "raise": (py_raise, 'function(df) stop("ошибка ü — broken on purpose")', {},
              ClosureError, ["ошибка ü — broken on purpose"], 30),
    "exit": (py_exit, "function(df) quit(save = 'no', status = 3)", {},
             ChildDiedError, ["exit code 3"], 30),
    "segfault": (py_segfault, "function(df) tools::pskill(Sys.getpid(), 11L)", {},
                 ChildDiedError, ["SIGSEGV(-11)"], 30),
    "hang-timeout": (py_hang, "function(df) { Sys.sleep(120); df }", {"timeout": 2},
                     LimitError, ["timeout of 2 s breached"], 20),
    "term-ignored": (py_ignore_term_and_hang,
                     "function(df) { system(\"trap '' TERM; sleep 120\"); df }", {"timeout": 2},
                     LimitError, ["timeout of 2 s breached"], 25),
    "memory": (py_memory, "function(df) { x <- numeric(9e7); x[] <- 1; Sys.sleep(120); df }",
               {"memory_limit": "400MB"}, LimitError, ["memory_limit of 400.0 MB breached"], 30),
    "bad-result": (py_unconvertible, "function(df) function(x) x", {},
                   ClosureError, [], 30),
}


def run_on_driver(f, options: dict, rows: int = 20):
    """The Worker exactly as a task runs it, here on the driver: the error type itself."""
    gw = Gateway(log_path=None)
    try:
        opts = dict(options)
        memory = opts.pop("memory_limit", None)
        from workerbridge.task.supervise import parse_bytes
        spec = TaskSpec(pack(f), RUNTIME.digest, None, gw.address,
                        WorkerOptions(memory_limit=parse_bytes(memory) if memory else None, **opts))
        table = pa.table({"x": list(range(rows))})
        return list(Worker(spec, 5, "fault", root=ROOT).run(table.to_batches()))
    finally:
        gw.stop()


@pytest.mark.parametrize("lang", ["python", "r"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fault_case_typed_on_the_driver(case, lang):
    py_f, r_code, options, error_type, parts, bound = CASES[case]
    f = py_f if lang == "python" else R(r_code)
    fds = psutil.Process().num_fds()
    t0 = time.monotonic()
    with pytest.raises(error_type) as info:
        run_on_driver(f, options)
    elapsed = time.monotonic() - t0
    text = str(info.value)
    role = "PyScript" if lang == "python" else "RScript"
    assert f"{role} ({'Python' if lang == 'python' else 'R'}) failed in partition 5" in text
    assert "Hint:" in text
    for part in parts:
        assert part in text
    assert elapsed < bound, f"{case} took {elapsed:.1f} s"
    end = time.monotonic() + 3          # the Gateway's connection threads close as they exit
    while psutil.Process().num_fds() > fds and time.monotonic() < end:
        time.sleep(0.05)
    assert psutil.Process().num_fds() <= fds, "file descriptors leaked"


@pytest.mark.parametrize("lang", ["python", "r"])
def test_fault_surfaces_through_spark_and_session_stays_usable(spark, lang):
    df = spark.range(10).repartition(2)
    f = py_raise if lang == "python" else R(CASES["raise"][1])
    with pytest.raises(Exception) as info:
        spark_apply(df, f, schema="id long").collect()
    assert "ошибка ü — broken on purpose" in str(info.value)
    # the next job on the same session succeeds
    g = (lambda d: d) if lang == "python" else R("function(d) d")
    assert sorted(r.id for r in spark_apply(df, g, schema="id long").collect()) == list(range(10))


def _wait_for_children(n: int = 1, timeout: float = 60.0) -> list:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = child_processes()
        if len(found) >= n:
            return sorted(found)
        time.sleep(0.05)
    raise AssertionError("no child process appeared")


def _collect_in_thread(out, group=None):
    box = {}

    def go():
        if group:        # local properties are per thread: set the group in this one
            out.sparkSession.sparkContext.setJobGroup(group, "cancel test", interruptOnCancel=True)
        try:
            box["rows"] = out.collect()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


@pytest.mark.parametrize("lang", ["python", "r"])
def test_sigkill_from_outside_is_named(spark, lang):
    df = spark.range(4).repartition(1)
    f = py_hang if lang == "python" else R(CASES["hang-timeout"][1])
    t, box = _collect_in_thread(spark_apply(df, f, schema="id long"))
    pid = _wait_for_children()[0]
    time.sleep(0.5)                                    # let it reach the closure
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    assert "SIGKILL(-9)" in str(box["error"])


@pytest.mark.parametrize("lang", ["python", "r"])
def test_job_cancel_leaves_no_orphan(spark, lang):
    df = spark.range(4).repartition(2)
    f = py_hang if lang == "python" else R(CASES["hang-timeout"][1])
    t, box = _collect_in_thread(spark_apply(df, f, schema="id long"), group="wb-cancel")
    _wait_for_children(2)
    t0 = time.monotonic()
    spark.sparkContext.cancelJobGroup("wb-cancel")
    t.join(30)
    assert "error" in box and "cancel" in str(box["error"]).lower()
    end = time.monotonic() + 15
    while child_processes() and time.monotonic() < end:
        time.sleep(0.1)
    assert not child_processes(), "children outlived the cancelled job"
    assert time.monotonic() - t0 < 15


def test_unpicklable_in_child_is_named(spark, tmp_path):
    """A closure from a module the child cannot import fails as an unpickle error
    (with ship=False: by default a local module travels by value, test_shipping.py)."""
    mod = tmp_path / "wb_only_on_driver.py"
    mod.write_text("def f(d):\n    return d\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import wb_only_on_driver
        with pytest.raises(Exception) as info:
            spark_apply(spark.range(3), wb_only_on_driver.f, schema="id long",
                        ship=False).collect()
        text = str(info.value)
        assert "No module named 'wb_only_on_driver'" in text
        assert "could not be loaded in the child" in text
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("wb_only_on_driver", None)


FAKE_CHILD = textwrap.dedent("""
    import os, socket, sys
    sys.path.insert(0, os.environ["WB_SRC"])
    from workerbridge.wire import protocol as P
    secret = sys.stdin.buffer.readline().strip()
    s = socket.create_connection(("127.0.0.1", int(os.environ[P.ENV_PORT])))
    P.send_frame(s, P.AUTH, secret)
    P.send_json(s, P.HELLO, {"pid": os.getpid(), "protocol": P.PROTOCOL_VERSION})
    r = s.makefile("rb")
    P.expect(r, P.WELCOME)
    mode = os.environ["WB_FAKE"]
    if mode == "garbage":
        s.sendall(b"\\xde\\xad\\xbe\\xef" * 64)
    elif mode == "truncated-frame":
        s.sendall(P.pack_header(P.LOG, 1000) + b'{"level":')
    elif mode == "oversized-frame":
        s.sendall(P.pack_header(P.LOG, 2**31))
    elif mode == "cut-arrow-stream":
        import pyarrow as pa
        P.send_frame(s, P.OUTPUT)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pa.schema([("x", pa.int64())])) as w:
            w.write_batch(pa.record_batch([pa.array(range(10000))], names=["x"]))
        data = sink.getvalue().to_pybytes()
        s.sendall(data[: len(data) // 2])
    elif mode == "wrong-protocol":
        pass
    elif mode == "exit-during-input":
        os._exit(0)        # the Worker is still sending the partition: its send fails
    sys.stderr.write("fake child done\\n")
    sys.stderr.flush()
    if mode in ("garbage", "oversized-frame"):
        import time
        time.sleep(5)      # alive: what the Worker meets is the bad bytes, not a death
    os._exit(0)
""")


def fake_child_options(tmp_path, mode: str) -> dict:
    """Options that make the Worker start FAKE_CHILD in `mode` as its Python."""
    script = tmp_path / "fakepython"
    body = tmp_path / "fake_child.py"
    body.write_text(FAKE_CHILD)
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {body}\n")
    script.chmod(0o755)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {"python": str(script), "env": {"WB_FAKE": mode, "WB_SRC": src}}


@pytest.mark.parametrize("mode, expected", [
    ("garbage", "unknown message type"),
    ("truncated-frame", "ended before finishing"),
    ("oversized-frame", "announces 2147483648 bytes"),
    ("cut-arrow-stream", "ended before finishing"),
])
def test_transport_faults_are_typed(tmp_path, mode, expected):
    options = fake_child_options(tmp_path, mode)
    t0 = time.monotonic()
    with pytest.raises((TransportError, ChildDiedError)) as info:
        run_on_driver(lambda d: d, options)
    assert expected in str(info.value)
    assert time.monotonic() - t0 < 20


def test_a_child_gone_while_its_input_is_sent_is_not_an_upstream_failure(tmp_path):
    """The child exits while the Worker's writer is still sending a large
    partition: the failed send is the child's side, and the error says the
    child ended, not that Spark's input failed."""
    options = fake_child_options(tmp_path, "exit-during-input")
    for _ in range(3):
        with pytest.raises((TransportError, ChildDiedError)) as info:
            run_on_driver(lambda d: d, options, rows=3_000_000)
        assert "ended before finishing" in str(info.value)
        assert "upstream" not in str(info.value)


def test_missing_rscript_and_r_package(spark):
    with pytest.raises(BadInputError, match="Rscript not found"):
        spark_apply(spark.range(3), R("function(d) d"), rscript="/nonexistent/Rscript")
    with pytest.raises(Exception) as info:
        spark_apply(spark.range(3), R("function(d) d"), packages=["surely.not.a.package"],
                    schema="id long").collect()
    text = str(info.value)
    assert "surely.not.a.package" in text and ".libPaths" in text
