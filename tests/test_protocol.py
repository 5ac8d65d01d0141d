"""The wire protocol and the handshake, over real sockets with real children."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pytest

from workerbridge.wire import protocol as P
from workerbridge.driver.closure import pack
from workerbridge.driver.gateway import Gateway
from wbtest import ROOT, RUNTIME
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import PY_CHILD_MAIN, Worker


def frames(*parts: tuple) -> io.BytesIO:
    buf = io.BytesIO()
    for msg_type, payload in parts:
        buf.write(P.pack_header(msg_type, len(payload)) + payload)
    buf.seek(0)
    return buf


def test_frame_round_trip_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        P.send_json(a, P.LOG, {"message": "héllo"})
        P.send_frame(a, P.CLOSURE, b"x" * 100_000)
        reader = b.makefile("rb")
        assert P.decode_json(P.expect(reader, P.LOG)) == {"message": "héllo"}
        assert P.expect(reader, P.CLOSURE) == b"x" * 100_000


def test_unknown_type_oversize_and_short_reads_are_errors():
    with pytest.raises(P.ProtocolError, match="unknown message type 99"):
        P.recv_frame(frames((99, b"")))
    with pytest.raises(P.ProtocolError, match="announces 2000 bytes"):
        P.recv_frame(io.BytesIO(P.pack_header(P.AUTH, 2000)), P.MAX_AUTH_BYTES)
    with pytest.raises(P.PeerClosed, match="after 3 of 10 bytes"):
        P.recv_frame(io.BytesIO(P.pack_header(P.LOG, 10) + b"abc"))
    with pytest.raises(P.PeerClosed):
        P.recv_frame(io.BytesIO(b"\x00\x00"))
    with pytest.raises(P.ProtocolError, match="expected WELCOME, got LOG"):
        P.expect(frames((P.LOG, b"{}")), P.WELCOME)


def test_message_table_is_unique():
    assert len(set(P.MESSAGE_TYPES.values())) == len(P.MESSAGE_TYPES)
    assert all(isinstance(v, int) and v > 0 for v in P.MESSAGE_TYPES.values())


@pytest.fixture()
def slow_python(tmp_path):
    """An interpreter wrapper that waits before starting the real child: a window
    in which a stranger can reach the backend port first."""
    script = tmp_path / "slowpython"
    script.write_text(f"#!/bin/sh\nsleep 1.5\nexec {sys.executable} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _run_worker_in_thread(spec):
    result = {}

    def go():
        try:
            table = pa.table({"x": list(range(5))})
            result["batches"] = list(Worker(spec, 0, "sec", root=ROOT).run(table.to_batches()))
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=go)
    t.start()
    return t, result


def _backend_port(gw: Gateway, timeout=10.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ln in gw.lines(filter="to connect to port", n=None):
            return int(ln.rsplit(" ", 1)[1])
        time.sleep(0.02)
    raise AssertionError("no backend port was logged")


@pytest.mark.parametrize("intruder", ["wrong-secret", "silent", "garbage"])
def test_backend_refuses_strangers_and_serves_the_child(slow_python, intruder):
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(lambda d: d), RUNTIME.digest, None, gw.address,
                        WorkerOptions(python=slow_python, auth_timeout=0.5))
        t, result = _run_worker_in_thread(spec)
        port = _backend_port(gw)
        listening = [c for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port in (port, gw.port)]
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"} and len(listening) == 2
        stranger = socket.create_connection(("127.0.0.1", port))
        stranger.settimeout(5)
        if intruder == "wrong-secret":
            P.send_frame(stranger, P.AUTH, b"0" * 64)
        elif intruder == "garbage":
            stranger.sendall(b"GET / HTTP/1.1\r\n\r\n")
        # The Worker closes the stranger's connection without a word.
        assert closed_by_peer(stranger)
        stranger.close()
        t.join(30)
        assert "error" not in result, result.get("error")
        assert pa.Table.from_batches(result["batches"]).column("x").to_pylist() == list(range(5))
        assert gw.lines(filter="refused a backend connection without the task's secret")
    finally:
        gw.stop()


def test_secret_is_not_in_argv_or_environment(tmp_path):
    """The child's argv and environment never hold the secret."""
    spy = tmp_path / "spypython"
    record = tmp_path / "record"
    spy.write_text(f"#!/bin/sh\necho \"$@\" > {record}\nenv >> {record}\nexec {sys.executable} \"$@\"\n")
    spy.chmod(0o755)
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(lambda d: d), RUNTIME.digest, None, gw.address,
                        WorkerOptions(python=str(spy)))
        worker = Worker(spec, 0, "argv", root=ROOT)
        seen = {}
        orig = worker._accept

        def spy_accept(listener, secret, deadline):
            seen["secret"] = secret
            return orig(listener, secret, deadline)

        worker._accept = spy_accept
        list(worker.run(pa.table({"x": [1]}).to_batches()))
        text = record.read_text()
        assert len(seen["secret"]) == 2 * P.SECRET_BYTES
        assert seen["secret"] not in text
        assert f"{P.ENV_PORT}=" in text
    finally:
        gw.stop()


def closed_by_peer(sock) -> bool:
    """The peer closed: end of stream, or a reset (a close with our bytes unread)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_gateway_refuses_wrong_secret():
    gw = Gateway(log_path=None)
    try:
        s = socket.create_connection((gw.host, gw.port))
        s.settimeout(5)
        assert P.expect(s.makefile("rb"), P.HELLO, P.MAX_AUTH_BYTES)   # the challenge
        P.send_frame(s, P.AUTH, b"nope")
        P.send_frame(s, P.LOG, "forged line".encode())
        assert closed_by_peer(s)
        s.close()
        end = time.monotonic() + 5
        while not gw.lines(filter="wrong secret") and time.monotonic() < end:
            time.sleep(0.02)
        assert gw.lines(filter="wrong secret")
        assert not gw.lines(filter="forged")
        assert gw.rejected == 1
    finally:
        gw.stop()


def test_second_connection_to_the_backend_is_refused(slow_python):
    """Once the child has proved the secret the listener is closed: nobody else gets in."""
    gw = Gateway(log_path=None)
    try:
        def slow(d):
            import time
            time.sleep(2)
            return d
        spec = TaskSpec(pack(slow), RUNTIME.digest, None, gw.address, WorkerOptions())
        t, result = _run_worker_in_thread(spec)
        port = _backend_port(gw)
        end = time.monotonic() + 20
        while not gw.lines(filter="is connected to backend") and time.monotonic() < end:
            time.sleep(0.02)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        t.join(30)
        assert "error" not in result, result.get("error")
    finally:
        gw.stop()


def test_oversized_frame_before_auth_is_refused_unread(slow_python):
    """A stranger announcing a 2 GiB AUTH frame is closed at once: nothing is read or
    unpickled, and the real child still gets in."""
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(lambda d: d), RUNTIME.digest, None, gw.address,
                        WorkerOptions(python=slow_python))
        t, result = _run_worker_in_thread(spec)
        port = _backend_port(gw)
        stranger = socket.create_connection(("127.0.0.1", port))
        stranger.settimeout(5)
        stranger.sendall(P.pack_header(P.AUTH, 2**31) + b"x" * 1000)
        assert closed_by_peer(stranger)
        stranger.close()
        t.join(30)
        assert "error" not in result, result.get("error")
    finally:
        gw.stop()


def test_a_fault_of_pyscript_itself_is_an_exit_code_and_its_traceback():
    """A fault in PyScript's own code (here a TASK that is not an object, as a
    Worker bug could send) ends the child with exit code 4 and the traceback
    on stderr: not SIGABRT at interpreter teardown, where its stdin watcher
    thread would still be reading.  The Worker's side is played by hand."""
    listener = socket.create_server(("127.0.0.1", 0))
    env = dict(os.environ, PYTHONPATH=ROOT, **{P.ENV_PORT: str(listener.getsockname()[1])})
    secret = "ab" * P.SECRET_BYTES
    proc = subprocess.Popen([sys.executable, "-c", PY_CHILD_MAIN], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(secret.encode("ascii") + b"\n")
        proc.stdin.flush()
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(30)
        stream = conn.makefile("rb")
        assert P.expect(stream, P.AUTH) == secret.encode("ascii")
        P.expect(stream, P.HELLO)
        P.send_json(conn, P.WELCOME, {"protocol": P.PROTOCOL_VERSION})
        P.send_json(conn, P.TASK, ["not", "an", "object"])
        code = proc.wait(30)
        err = proc.stderr.read().decode("utf-8", "replace")
        assert code == 4, (code, err)
        assert "PyScript: internal error" in err and "AttributeError" in err
        assert "Fatal Python error" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
        proc.stderr.close()
        listener.close()
