"""The sink a Worker writes its lifecycle lines to.

Covers: :class:`LogSink`, which sends a task's lines to the driver's Gateway over one
authenticated connection per Python worker process, or to stderr (the executor
log) when the Gateway cannot be reached.  Does not cover: the Gateway server
(``gateway``).

"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..wire import protocol as P
from ..wire.logline import format_line

@dataclass(frozen=True)
class GatewayAddress:
    """Where a Worker finds the Gateway; travels inside the task closure."""
    host: str
    port: int
    secret: str


class _Connection:
    """One authenticated connection to a Gateway, shared by the tasks of a process."""

    _cache: dict = {}
    _cache_lock = threading.Lock()

    def __init__(self, address: GatewayAddress, timeout: float = 5.0):
        # The timeout bounds every send and the flush acknowledgement: a stuck
        # Gateway costs a task at most this long before lines go to stderr.
        self.sock = socket.create_connection((address.host, address.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.lock = threading.Lock()
        P.send_frame(self.sock, P.AUTH, address.secret.encode("ascii"))

    @classmethod
    def get(cls, address: GatewayAddress) -> "_Connection":
        with cls._cache_lock:
            conn = cls._cache.get(address)
            if conn is None:
                conn = cls._cache[address] = cls(address)
            return conn

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
    falls back to stderr and says so once.
    """

    def __init__(self, ident: object, address: Optional[GatewayAddress]):
        self.ident = ident
        self.address = address
        self._conn: Optional[_Connection] = None
        if address is not None:
            try:
                self._conn = _Connection.get(address)
                with self._conn.lock:
                    P.send_json(self._conn.sock, P.HELLO, {"worker": str(ident)})
            except OSError as e:
                self._fallback(f"cannot reach the Gateway at {address.host}:{address.port} ({e}); "
                               "lines go to stderr")

    def _fallback(self, why: str) -> None:
        if self.address is not None:
            _Connection.drop(self.address)
        self._conn = None
        sys.stderr.write(format_line("Worker", self.ident, why, "WARN") + "\n")

    def write(self, role: str, message: str, level: str = "INFO") -> None:
        line = format_line(role, self.ident, message, level)
        conn = self._conn
        if conn is not None:
            try:
                with conn.lock:
                    P.send_frame(conn.sock, P.LOG, line.encode("utf-8"))
                return
            except OSError as e:
                self._fallback(f"lost the Gateway connection ({e}); lines go to stderr")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def flush(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            with conn.lock:
                P.send_frame(conn.sock, P.DONE)
                P.expect(conn.reader, P.DONE, P.MAX_AUTH_BYTES)
        except (OSError, P.ProtocolError) as e:
            self._fallback(f"Gateway did not acknowledge ({e}); lines go to stderr")
