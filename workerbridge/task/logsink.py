"""The sink a Worker writes its lifecycle lines to.

Covers: :class:`LogSink`, which sends a task's lines to the driver's Gateway over
one connection per Python worker process (both sides prove the job's secret
first, ``wire.handshake``), or to stderr (the executor log) when the Gateway
cannot be reached, saying so once per process.  Time spent on the Gateway is
bounded per task (``GATEWAY_BUDGET_S``); a process that failed to reach it tries
again after ``RETRY_AFTER_S``.  A sink keeps its task's newest lines, so a failed
task can carry them in its exception.  With Spark's Python worker logging on
(Spark 4.1+), each line is also a ``logging`` record that Spark collects.  Does
not cover: the line format (``wire.logline``) or the Gateway server
(``driver.gateway``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..wire import handshake
from ..wire import protocol as P
from ..wire.logline import SPARK_LOGGER, cap_line, format_line

GATEWAY_BUDGET_S = 5.0              # a task's time on a slow or dead Gateway, at most
RETRY_AFTER_S = 30.0                # a process that could not reach it waits this long
KEPT_LINES, KEPT_BYTES = 200, 256 * 1024   # a task's newest lines, for its exception


@dataclass(frozen=True)
class GatewayAddress:
    """Where a Worker finds the Gateway; travels inside the task closure.
    ``spark_worker_logs``: also hand each line to Spark's Python worker logging."""
    host: str
    port: int
    secret: str
    spark_worker_logs: bool = False


class GatewayRefused(OSError):
    """The listener at the Gateway's address did not prove the job's secret."""


class _Connection:
    """One connection to a Gateway, both sides authenticated; shared by a process's tasks."""

    _cache: dict = {}
    _failed: dict = {}          # address -> monotonic time of the last failure
    _warned: set = set()        # addresses this process has said it cannot reach
    _cache_lock = threading.Lock()

    def __init__(self, address: GatewayAddress, timeout: float):
        self.sock = socket.create_connection((address.host, address.port), timeout=timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.reader = self.sock.makefile("rb")
            self.lock = threading.Lock()
            self._prove(address)
        except BaseException:
            P.close_quietly(self.sock)
            raise

    def _prove(self, address: GatewayAddress) -> None:
        where = f"{address.host}:{address.port}"
        try:
            theirs = P.decode_json(P.expect(self.reader, P.HELLO, P.MAX_AUTH_BYTES)).get("nonce")
        except (P.ProtocolError, AttributeError) as e:
            raise GatewayRefused(f"the listener at {where} does not speak the Gateway's "
                                 f"protocol ({e})") from None
        if not handshake.valid_nonce(theirs):
            raise GatewayRefused(f"the listener at {where} sent no valid challenge")
        ours = handshake.new_nonce()
        P.send_json(self.sock, P.AUTH, {"nonce": ours, "proof": handshake.proof(
            address.secret, "worker", theirs, ours)})
        try:
            rec = P.decode_json(P.expect(self.reader, P.WELCOME, P.MAX_AUTH_BYTES))
        except P.ProtocolError as e:
            raise GatewayRefused(f"the listener at {where} refused this job's proof ({e})") \
                from None
        if not isinstance(rec, dict) or not handshake.check(
                rec.get("proof"), address.secret, "gateway", theirs, ours):
            raise GatewayRefused(f"the listener at {where} did not prove the job's secret: "
                                 "it is not this job's Gateway")

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(max(seconds, 0.001))

    @classmethod
    def get(cls, address: GatewayAddress, timeout: float) -> Optional["_Connection"]:
        """The cached connection; a new one; or None while a recent failure stands."""
        with cls._cache_lock:
            conn = cls._cache.get(address)
            if conn is not None:
                return conn
            failed = cls._failed.get(address)
            if failed is not None and time.monotonic() - failed < RETRY_AFTER_S:
                return None
            conn = cls._cache[address] = cls(address, timeout)
            cls._failed.pop(address, None)
            return conn

    @classmethod
    def failed(cls, address: GatewayAddress) -> bool:
        """Note a failure; True the first time this process notes one for ``address``."""
        with cls._cache_lock:
            cls._failed[address] = time.monotonic()
            first = address not in cls._warned
            cls._warned.add(address)
        cls.drop(address)
        return first

    @classmethod
    def drop(cls, address: GatewayAddress) -> None:
        with cls._cache_lock:
            conn = cls._cache.pop(address, None)
        if conn is not None:
            P.close_quietly(conn.reader, conn.sock)


def drop_connection(address: GatewayAddress) -> None:
    """Close this process's cached connection to the Gateway at ``address``."""
    _Connection.drop(address)


class LogSink:
    """Writes the lines of one task (one ``id``) to the Gateway, else to stderr.

    Lines are sent as they happen; :meth:`flush` waits until the Gateway holds
    every line sent so far, so that ``spark_log`` right after an action sees
    the whole task.  A broken Gateway connection never fails a task: the sink
    falls back to stderr and says so once per process; all the Gateway costs a
    task is GATEWAY_BUDGET_S.  :meth:`kept` gives the task's newest lines.
    """

    def __init__(self, ident: object, address: Optional[GatewayAddress]):
        self.ident = ident
        self.address = address
        self.sent = 0
        self._kept: collections.deque = collections.deque(maxlen=KEPT_LINES)
        self._kept_bytes = 0
        self._spent = 0.0           # seconds this task has waited on the Gateway
        self._conn: Optional[_Connection] = None
        self._spark = None
        if address is not None and address.spark_worker_logs:
            self._spark = logging.getLogger(SPARK_LOGGER)
            self._spark.setLevel(logging.INFO)
        if address is not None:
            t0 = time.monotonic()
            try:
                self._conn = _Connection.get(address, GATEWAY_BUDGET_S)
                self._spent = time.monotonic() - t0
                if self._conn is not None:
                    with self._conn.lock, self._timed(self._conn):
                        P.send_json(self._conn.sock, P.HELLO, {"worker": str(ident)})
            except OSError as e:
                self._fallback(f"cannot reach the Gateway at {address.host}:{address.port} ({e}); "
                               "lines go to stderr")

    @contextlib.contextmanager
    def _timed(self, conn: _Connection):
        """Bound one exchange by what is left of the task's budget, and count its time."""
        conn.settimeout(GATEWAY_BUDGET_S - self._spent)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._spent += time.monotonic() - t0

    def _fallback(self, why: str, unsure: bool = False) -> None:
        """From now on, stderr.  ``unsure``: lines already sent may not have arrived,
        so the kept ones go to stderr too (a line twice beats a line lost)."""
        self._conn = None
        if unsure:
            for line in self.kept():
                sys.stderr.write(line + "\n")
        if self.address is not None and _Connection.failed(self.address):
            line = format_line("Worker", self.ident, why + f" (said once per process; "
                               f"retried after {RETRY_AFTER_S:g} s)", "WARN")
            if self._spark is not None:
                self._spark.info(line)
            self._emit(line)

    def _emit(self, line: str) -> None:
        """A line to stderr, and kept."""
        self._keep(line)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _keep(self, line: str) -> None:
        if len(self._kept) == self._kept.maxlen:
            self._kept_bytes -= len(self._kept[0])
        self._kept.append(line)
        self._kept_bytes += len(line)
        while self._kept_bytes > KEPT_BYTES and len(self._kept) > 1:
            self._kept_bytes -= len(self._kept.popleft())

    def kept(self) -> list[str]:
        """The task's newest lines (at most KEPT_LINES, KEPT_BYTES), oldest first."""
        return list(self._kept)

    def write(self, role: str, message: str, level: str = "INFO") -> None:
        line = cap_line(format_line(role, self.ident, message, level))
        if self._spark is not None:
            self._spark.info(line)
        conn = self._conn
        if conn is not None:
            try:
                with conn.lock, self._timed(conn):
                    P.send_frame(conn.sock, P.LOG, line.encode("utf-8"))
                self.sent += 1
                self._keep(line)
                return
            except OSError as e:
                self._fallback(f"lost the Gateway connection ({_why(e)}); lines go to stderr",
                               unsure=True)
        self._emit(line)

    def flush(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            with conn.lock, self._timed(conn):
                P.send_json(conn.sock, P.DONE, {"lines": self.sent})
                P.expect(conn.reader, P.DONE, P.MAX_AUTH_BYTES)
        except (OSError, P.ProtocolError) as e:
            self._fallback(f"Gateway did not acknowledge ({_why(e)}); lines go to stderr",
                           unsure=True)
        self.sent = 0


def _why(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return f"no progress within the {GATEWAY_BUDGET_S:g} s a task may spend on it"
    return str(e) or type(e).__name__
