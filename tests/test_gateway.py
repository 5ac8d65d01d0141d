"""The Gateway and its Worker-side client, for real: sockets, another user (nobody), a stopped
Gateway process.

Covers: the private log directory and file (a planted symlink, a directory or file of
``nobody``), ``workerbridge logs`` reading only this user's files, the line cap and the
byte bound of the store, silent connections (capped, ended by the handshake deadline, no
thread each), a listener that is not the Gateway (learns no secret, gets no line), and
the time a stopped Gateway costs a task (bounded, warned once, no line lost).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from workerbridge import cli
from workerbridge.driver.gateway import HANDSHAKE_S, MAX_UNAUTHENTICATED, Gateway
from workerbridge.driver.privatefiles import NotPrivateError, user_dir
from workerbridge.task.logsink import GATEWAY_BUDGET_S, GatewayAddress, LogSink
from workerbridge.wire import handshake
from workerbridge.wire import protocol as P
from workerbridge.wire.logline import LINE_CAP_BYTES

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(script: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("acting as another user (nobody) needs root")
    subprocess.run(NOBODY + ["sh", "-c", script], check=True, timeout=30)


@pytest.fixture
def shared():
    """Makes sticky world-writable directories, like /tmp, that nobody can reach (pytest's
    own tmp_path is private to root); removed afterwards."""
    made = []

    def make() -> str:
        path = tempfile.mkdtemp(prefix=f"wbtest-{os.getpid()}-")
        os.chmod(path, 0o1777)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def authenticated(gw: Gateway) -> socket.socket:
    """A raw connection that has done the real handshake (to send frames a LogSink would not)."""
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    r = s.makefile("rb")
    theirs = P.decode_json(P.expect(r, P.HELLO, P.MAX_AUTH_BYTES))["nonce"]
    ours = handshake.new_nonce()
    P.send_json(s, P.AUTH, {"nonce": ours,
                            "proof": handshake.proof(gw.secret, "worker", theirs, ours)})
    welcome = P.decode_json(P.expect(r, P.WELCOME, P.MAX_AUTH_BYTES))
    assert handshake.check(welcome["proof"], gw.secret, "gateway", theirs, ours)
    return s


def wait_until(check, seconds: float = 10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    return check()


# ---- files -------------------------------------------------------------------------------
def test_log_file_is_private_and_a_planted_one_is_refused(tmp_path, shared):
    base = shared()
    as_nobody(f"mkdir -m 777 {base}/workerbridge-{os.getuid()}")
    with pytest.raises(NotPrivateError, match="belongs to uid 65534"):
        user_dir(base)

    mine = user_dir(shared())
    assert os.stat(mine).st_mode & 0o777 == 0o700 and user_dir(os.path.dirname(mine)) == mine
    gw = Gateway(os.path.join(mine, "workerbridge-app-1.log"))
    gw.stop()
    assert os.stat(gw.log_path).st_mode & 0o777 == 0o600

    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    link = os.path.join(mine, "workerbridge-app-2.log")
    os.symlink(target, link)
    gw = Gateway(link)
    try:
        assert gw.log_path is None
        assert gw.lines(filter="refused the log file")
    finally:
        gw.stop()
    assert target.read_text() == "precious\n"


def test_logs_command_reads_only_files_this_user_owns(tmp_path, capsys, monkeypatch, shared):
    base = shared()
    as_nobody(f"echo 'nobody line' > {base}/workerbridge-app-theirs.log")
    theirs = os.path.join(base, "workerbridge-app-theirs.log")
    assert os.stat(theirs).st_uid == 65534
    assert cli.main(["logs", "--path", theirs]) == 2
    assert "belongs to uid 65534" in capsys.readouterr().out

    own = tmp_path / "own.log"
    own.write_text("my line\n")
    link = os.path.join(base, "workerbridge-app-link.log")
    os.symlink(own, link)
    assert cli.main(["logs", "--path", link]) == 2
    assert "symlink; refused" in capsys.readouterr().out

    monkeypatch.setenv("SPARK_LOCAL_DIRS", base)
    assert cli.newest_log() not in (theirs, link)
    mine = os.path.join(user_dir(base), "workerbridge-app-mine.log")
    with open(mine, "w") as f:
        f.write("mine\n")
    assert cli.newest_log() == mine
    assert cli.main(["logs", "--path", mine]) == 0 and capsys.readouterr().out == "mine\n"


# ---- bounds --------------------------------------------------------------------------------
def test_lines_are_capped_and_memory_is_bounded_in_bytes():
    gw = Gateway(log_path=None, max_bytes=2 * 2**20)
    try:
        s = authenticated(gw)
        big = ("x" * (2**20)).encode()                       # 1 MiB frames, past the Worker's cap
        for _ in range(40):
            P.send_frame(s, P.LOG, big)
        P.send_json(s, P.DONE, {"lines": 40})
        assert P.expect(s.makefile("rb"), P.DONE) == b""
        s.close()
        kept = gw.lines(filter="xxxx", n=None)
        assert kept and all(len(ln.encode()) < LINE_CAP_BYTES + 200 for ln in kept)
        assert all(ln.endswith(f"[line truncated: {2**20} bytes, the first {LINE_CAP_BYTES} kept]")
                   for ln in kept)
        assert gw.held_bytes <= gw.max_bytes and gw.dropped > 0
        assert sum(len(ln) for ln in gw.lines(n=None)) <= gw.max_bytes
        assert gw.counts == {"written": 40, "delivered": 40}

        sink = LogSink(9, gw.address)                           # the Worker caps before sending
        sink.write("PyClosure", "y" * 200_000)
        sink.flush()
        line = gw.lines(filter="yyyy", n=1)[0]
        assert len(line.encode()) <= LINE_CAP_BYTES and "line truncated" in line
    finally:
        gw.stop()


def test_silent_connections_neither_stall_nor_multiply_threads():
    gw = Gateway(log_path=None)
    silent = []
    try:
        threads = threading.active_count()
        silent = [socket.create_connection((gw.host, gw.port)) for _ in range(MAX_UNAUTHENTICATED + 16)]
        assert wait_until(lambda: gw.rejected >= 16, 5), gw.lines(filter="refused")
        assert gw.lines(filter=f"dropped: {MAX_UNAUTHENTICATED} newer ones were authenticating")
        t0 = time.monotonic()
        sink = LogSink(11, gw.address)
        sink.write("Worker", "through the crowd")
        sink.flush()
        took = time.monotonic() - t0
        print(f"a Worker's first line past {len(silent)} silent connections: {took:.3f} s")
        assert gw.lines(filter="through the crowd") and took < HANDSHAKE_S
        assert threading.active_count() <= threads + 1
        # each silent connection is closed once the handshake deadline passes
        assert wait_until(lambda: gw.rejected >= len(silent), HANDSHAKE_S + 5)
        assert gw.lines(filter=f"did not authenticate within {HANDSHAKE_S:g} s")
        for s in silent[:5]:
            s.settimeout(5)
            data = s.recv(4096)                       # the challenge, then the close
            while data:
                data = s.recv(4096)
    finally:
        for s in silent:
            s.close()
        gw.stop()


# ---- a listener that is not the Gateway ---------------------------------------------------
def test_a_listener_that_is_not_the_gateway_learns_nothing(capfd):
    """What a Worker on another host met before: something else on the Gateway's port."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: dict = {"bytes": b""}

    def impostor():
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            P.send_json(conn, P.HELLO, {"nonce": handshake.new_nonce()})
            r = conn.makefile("rb")
            seen["auth"] = P.decode_json(P.expect(r, P.AUTH, P.MAX_AUTH_BYTES))
            P.send_json(conn, P.WELCOME, {"proof": "0" * 64})      # it cannot prove the secret
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    seen["bytes"] += chunk
            except OSError:
                pass

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    secret = "s3cr3t" * 10
    sink = LogSink(21, GatewayAddress("127.0.0.1", server.getsockname()[1], secret))
    sink.write("Worker", "a line with data values")
    sink.flush()
    t.join(10)
    server.close()
    err = capfd.readouterr().err
    assert "did not prove the job's secret" in err and "a line with data values" in err
    assert secret not in json.dumps(seen["auth"]) and seen["bytes"] == b""
    assert set(seen["auth"]) == {"nonce", "proof"}


# ---- back-pressure --------------------------------------------------------------------------
GATEWAY_PROCESS = r'''
import json, sys, time
from workerbridge.driver.gateway import Gateway
gw = Gateway(log_path=None)
print(json.dumps([gw.host, gw.port, gw.secret]), flush=True)
time.sleep(600)
'''


def one_task(ident: int, address: GatewayAddress, lines: int = 20) -> float:
    t0 = time.monotonic()
    sink = LogSink(ident, address)
    for i in range(lines):
        sink.write("Worker", f"task {ident} line {i}")
    sink.flush()
    return time.monotonic() - t0


def test_a_stopped_gateway_costs_a_task_a_bounded_time_and_no_line(capfd):
    """The Gateway process stopped (SIGSTOP) mid-job: the task that meets it waits at most
    GATEWAY_BUDGET_S, later tasks of the process go to stderr at once (retried after
    RETRY_AFTER_S), the warning comes once, and the unacknowledged lines are on stderr."""
    proc = subprocess.Popen([sys.executable, "-c", GATEWAY_PROCESS], stdout=subprocess.PIPE,
                            text=True)
    try:
        host, port, secret = json.loads(proc.stdout.readline())
        address = GatewayAddress(host, port, secret)
        healthy = [one_task(100 + i, address) for i in range(5)]
        os.kill(proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED)
        stalled = one_task(200, address)
        after = [one_task(300 + i, address) for i in range(10)]
        took = (f"task with 20 lines: healthy Gateway max {max(healthy):.3f} s; the task that "
                f"met the stopped Gateway {stalled:.2f} s; later tasks {after}")
        print(took)
        assert max(healthy) < 1.0, took
        assert stalled <= GATEWAY_BUDGET_S + 1.0, took
        assert max(after) < 0.5, took
        err = capfd.readouterr().err
        assert err.count("lines go to stderr") == 1, err[-2000:]
        assert all(f"task 200 line {i}" in err for i in range(20))
        assert all(f"task 309 line {i}" in err for i in range(20))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
