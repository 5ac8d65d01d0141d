"""The Gateway: a driver-side TCP server that collects log lines from Workers.

Covers: the server (loopback, secret-protected), the bounded in-memory store
that ``spark_log`` reads, and the log file.  Does not cover: how lines are
formatted (``wire.logline``) or sent (``task.logsink``), or Spark itself (the API finds the Gateway of a
session through :func:`Gateway.for_key`).

Conversation on one connection (frames of ``protocol``)::

    worker  -> AUTH   the Gateway's secret (checked in constant time, first)
    worker  -> HELLO  {"worker": id}   -> line "accepted registration of Worker (id)"
    worker  -> LOG    one formatted line (UTF-8)
    worker  -> DONE   flush request    <- DONE once every earlier line is stored
"""

from __future__ import annotations

import collections
import hmac
import os
import secrets
import socket
import threading
import time
from typing import Callable, Optional

from ..task.logsink import GatewayAddress, drop_connection
from ..wire import protocol as P
from ..wire.logline import format_line

DEFAULT_MAX_LINES = 100_000
AUTH_TIMEOUT_S = 5.0


class Gateway:
    """Collects lines; keeps the newest ``max_lines`` and appends all to ``log_path``.

    >>> gw = Gateway(log_path=None)
    >>> gw.add("workerbridge line")
    >>> gw.lines(n=1)
    ['workerbridge line']
    >>> gw.stop()
    """

    _registry: dict = {}
    _registry_lock = threading.Lock()

    def __init__(self, log_path: Optional[str], max_lines: int = DEFAULT_MAX_LINES,
                 host: str = "127.0.0.1"):
        self.pid = os.getpid()
        self.secret = secrets.token_hex(P.SECRET_BYTES)
        self.log_path = log_path
        self.dropped = 0
        self.rejected = 0
        self._lines: collections.deque = collections.deque(maxlen=max_lines)
        # When each line arrived (epoch seconds): Workers send lines as they happen,
        # so this is the event's time to within the loopback latency.
        self._times: collections.deque = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._conns: set = set()
        self._file = open(log_path, "a", encoding="utf-8", buffering=1) if log_path else None
        self._server = socket.create_server((host, 0))
        self.host, self.port = self._server.getsockname()[:2]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="workerbridge-gateway",
                                        daemon=True)
        self._thread.start()
        self.log(f"started on {self.host}:{self.port}"
                 + (f", log file {log_path}" if log_path else ""))

    # ---- the store -------------------------------------------------------------
    def add(self, line: str) -> None:
        now = time.time()
        with self._lock:
            if len(self._lines) == self._lines.maxlen:
                self.dropped += 1
            self._lines.append(line)
            self._times.append(now)
            if self._file is not None:
                self._file.write(line + "\n")
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(line)
            except Exception:       # a listener (progress) never breaks the Gateway
                pass

    def log(self, message: str, level: str = "INFO") -> None:
        self.add(format_line("Gateway", self.pid, message, level))

    def lines(self, filter: Optional[str] = None, n: Optional[int] = 100) -> list[str]:
        """Newest ``n`` lines containing ``filter``, oldest first."""
        with self._lock:
            found = [ln for ln in self._lines if filter is None or filter in ln]
        return found if n is None else found[-n:] if n > 0 else []

    def events(self, filter: Optional[str] = None) -> list[tuple[float, str]]:
        """Every kept line with its arrival time (epoch seconds), oldest first."""
        with self._lock:
            return [(t, ln) for t, ln in zip(self._times, self._lines)
                    if filter is None or filter in ln]

    def subscribe(self, fn: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    @property
    def address(self) -> GatewayAddress:
        return GatewayAddress(self.host, self.port, self.secret)

    # ---- the server ------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="workerbridge-gateway-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            with conn:
                conn.settimeout(AUTH_TIMEOUT_S)
                reader = conn.makefile("rb")
                try:
                    secret = P.expect(reader, P.AUTH, P.MAX_AUTH_BYTES)
                except (OSError, P.ProtocolError):
                    self._refuse("a connection that did not authenticate")
                    return
                if not hmac.compare_digest(secret, self.secret.encode("ascii")):
                    self._refuse("a connection with a wrong secret")
                    return
                conn.settimeout(None)
                while True:
                    msg_type, payload = P.recv_frame(reader)
                    if msg_type == P.LOG:
                        self.add(payload.decode("utf-8", "replace"))
                    elif msg_type == P.HELLO:
                        worker = P.decode_json(payload).get("worker", "?")
                        self.log(f"accepted registration of Worker ({worker})")
                    elif msg_type == P.DONE:
                        P.send_frame(conn, P.DONE)
                    else:
                        raise P.ProtocolError(f"unexpected {P.MESSAGE_NAMES[msg_type]}")
        except P.PeerClosed:
            return
        except (OSError, P.ProtocolError) as e:
            if not self._stopped.is_set():
                self.log(f"closed a Worker connection: {e}", "WARN")
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _refuse(self, what: str) -> None:
        self.rejected += 1
        self.log(f"refused {what}", "WARN")

    def stop(self) -> None:
        self._stopped.set()
        drop_connection(self.address)        # this process's own Worker connection, if any
        with self._lock:
            conns = list(self._conns)
        # shutdown() wakes the thread blocked in accept(), and ends each
        # connection's reads; close() alone would leave the port answering once more.
        for conn in [self._server, *conns]:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass
        if self._file is not None:
            with self._lock:
                self._file.close()
                self._file = None

    # ---- one Gateway per session ----------------------------------------------------
    @classmethod
    def for_key(cls, key: str, log_path_fn: Callable[[], Optional[str]],
                max_lines: int = DEFAULT_MAX_LINES) -> "Gateway":
        """The Gateway of session ``key``, started on first use."""
        with cls._registry_lock:
            gw = cls._registry.get(key)
            if gw is None or gw._stopped.is_set():
                gw = cls._registry[key] = cls(log_path_fn(), max_lines)
            return gw

    @classmethod
    def existing(cls, key: str) -> Optional["Gateway"]:
        with cls._registry_lock:
            return cls._registry.get(key)
