"""The Gateway: a driver-side TCP server that collects log lines from Workers.

Covers: the server (one asyncio loop on one thread for every connection; the
Worker and the Gateway prove the job's secret to each other first, see
``handshake``), the in-memory store that ``spark_log`` reads (bounded in lines
and in bytes; a line is capped at ``LINE_CAP_BYTES``) and the private log file.
Does not cover: how lines are formatted (``wire.logline``) or sent
(``task.logsink``), or where the Gateway listens (``session`` chooses the
address and finds the session's Gateway through :func:`Gateway.for_key`).

Conversation on one connection (frames of ``protocol``)::

    gateway -> HELLO  challenge; worker -> AUTH proof; gateway -> WELCOME proof
               (all within HANDSHAKE_S in total, at most MAX_UNAUTHENTICATED at once)
    worker  -> HELLO  {"worker": id}   -> line "accepted registration of Worker (id)"
    worker  -> LOG    one formatted line (UTF-8; longer than the cap: truncated, marked)
    worker  -> DONE   {"lines": n}     <- DONE once every earlier line is stored
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import threading
import time
from typing import Callable, Optional

from ..task.logsink import GatewayAddress, drop_connection
from ..wire import handshake
from ..wire import protocol as P
from ..wire.logline import LINE_CAP_BYTES, format_line, truncated
from .privatefiles import open_append

DEFAULT_MAX_LINES = 100_000
DEFAULT_MAX_BYTES = 64 * 2**20         # held lines, counted with LINE_OVERHEAD each
LINE_OVERHEAD = 100                    # bytes a held line costs beyond its text (measured ~90)
HANDSHAKE_S = 5.0                      # accept -> both proofs, in total
MAX_UNAUTHENTICATED = 64               # connections still in their handshake, at once


class Gateway:
    """Collects lines; keeps the newest (``max_lines``, ``max_bytes``) and appends all to
    ``log_path`` (a private file).

    >>> gw = Gateway(log_path=None)
    >>> gw.add("workerbridge line")
    >>> gw.lines(n=1)
    ['workerbridge line']
    >>> gw.stop()
    """

    _registry: dict = {}
    _registry_lock = threading.Lock()

    def __init__(self, log_path: Optional[str], max_lines: int = DEFAULT_MAX_LINES,
                 host: str = "127.0.0.1", port: int = 0, max_bytes: int = DEFAULT_MAX_BYTES,
                 advertise: Optional[str] = None):
        self.pid = os.getpid()
        self.secret = secrets.token_hex(P.SECRET_BYTES)
        self.dropped = 0                 # lines evicted from memory (still in the file)
        self.rejected = 0                # connections refused
        self.counts = {"written": 0, "delivered": 0}   # as Workers report them at DONE
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.held_bytes = 0
        self._store: collections.deque = collections.deque()   # (arrival time, line)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._pending: collections.OrderedDict = collections.OrderedDict()  # in handshake
        self._writers: set = set()                                          # every connection
        self._stopped = threading.Event()
        self.log_path, self._file, why_no_file = self._open_file(log_path)
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, host, port, backlog=128))
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self.advertised = advertise or self.host
        self.spark_worker_logs = False   # Workers also hand lines to Spark's logging (4.1+)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="workerbridge-gateway")
        self._thread.start()
        shown = self.host if self.advertised == self.host else \
            f"{self.host} (Workers dial {self.advertised})"
        self.log(f"started on {shown}:{self.port}"
                 + (f", log file {self.log_path}" if self.log_path else ""))
        if why_no_file:
            self.log(why_no_file, "WARN")

    @staticmethod
    def _open_file(path: Optional[str]):
        if not path:
            return None, None, None
        try:
            return path, open_append(path), None
        except OSError as e:
            return None, None, f"refused the log file {path}: {e}; lines are kept in memory only"

    # ---- the store -------------------------------------------------------------
    def add(self, line: str) -> None:
        now = time.time()
        with self._lock:
            self._store.append((now, line))
            self.held_bytes += len(line) + LINE_OVERHEAD
            while self._store and (len(self._store) > self.max_lines
                                   or self.held_bytes > self.max_bytes):
                _, old = self._store.popleft()
                self.held_bytes -= len(old) + LINE_OVERHEAD
                self.dropped += 1
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
            found = [ln for _, ln in self._store if filter is None or filter in ln]
        return found if n is None else found[-n:] if n > 0 else []

    def events(self, filter: Optional[str] = None) -> list[tuple[float, str]]:
        """Every kept line with its arrival time (epoch seconds), oldest first."""
        with self._lock:
            return [(t, ln) for t, ln in self._store if filter is None or filter in ln]

    def subscribe(self, fn: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    @property
    def address(self) -> GatewayAddress:
        return GatewayAddress(self.advertised, self.port, self.secret, self.spark_worker_logs)

    # ---- the server (coroutines on the Gateway's loop) ----------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if len(self._pending) >= MAX_UNAUTHENTICATED:
                # the oldest goes: a Worker's handshake takes a round trip, a stall all of it
                self._pending.popitem(last=False)[0].transport.abort()
            self._pending[writer] = None
            try:
                why = await asyncio.wait_for(self._handshake(reader, writer), HANDSHAKE_S)
            except asyncio.TimeoutError:
                why = f"a connection that did not authenticate within {HANDSHAKE_S:g} s"
            except (OSError, P.ProtocolError, asyncio.IncompleteReadError):
                why = "a connection that did not authenticate" + (
                    "" if writer in self._pending else
                    f" (dropped: {MAX_UNAUTHENTICATED} newer ones were authenticating)")
            finally:
                self._pending.pop(writer, None)
            if why:
                self._refuse(why)
                return
            await self._receive(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        except (OSError, P.ProtocolError) as e:
            if not self._stopped.is_set():
                self.log(f"closed a Worker connection: {e}", "WARN")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handshake(self, reader, writer) -> Optional[str]:
        """None once both sides proved the secret, else what was refused."""
        ours = handshake.new_nonce()
        writer.write(_frame(P.HELLO, {"nonce": ours}))
        await writer.drain()
        msg_type, payload = await _read_frame(reader, P.MAX_AUTH_BYTES)
        if msg_type != P.AUTH:
            return f"a connection that sent {P.MESSAGE_NAMES[msg_type]} before authenticating"
        rec = _json_object(payload)
        theirs = rec.get("nonce")
        if not handshake.valid_nonce(theirs) or theirs == ours or not handshake.check(
                rec.get("proof"), self.secret, "worker", ours, theirs):
            return "a connection with a wrong secret (its proof did not match)"
        writer.write(_frame(P.WELCOME, {"proof": handshake.proof(self.secret, "gateway",
                                                                 ours, theirs)}))
        await writer.drain()
        return None

    async def _receive(self, reader, writer) -> None:
        worker, received = "?", 0
        while True:
            msg_type, length = P.unpack_header(await reader.readexactly(P.HEADER_BYTES))
            if msg_type == P.LOG:
                self.add(await _read_line(reader, length))
                received += 1
            elif msg_type in (P.HELLO, P.DONE) and length <= P.MAX_AUTH_BYTES:
                rec = _json_object(await reader.readexactly(length))
                if msg_type == P.HELLO:
                    worker = str(rec.get("worker", "?"))
                    self.log(f"accepted registration of Worker ({worker})")
                    continue
                written = rec.get("lines")
                self._count(worker, written if isinstance(written, int) else received, received)
                received = 0
                writer.write(P.pack_header(P.DONE, 0))
                await writer.drain()
            else:
                raise P.ProtocolError(f"unexpected {P.MESSAGE_NAMES[msg_type]} frame of "
                                      f"{length} bytes")

    def _count(self, worker: str, written: int, received: int) -> None:
        with self._lock:
            self.counts["written"] += written
            self.counts["delivered"] += received
        if written != received:
            self.log(f"Worker ({worker}) wrote {written} lines, {received} arrived", "WARN")

    def _refuse(self, what: str) -> None:
        self.rejected += 1
        self.log(f"refused {what}", "WARN")

    # ---- ending ------------------------------------------------------------------
    def stop_listening(self) -> None:
        """Close the server socket and every connection; lines already held stay."""
        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):     # each reader ends at once, cleanly
                writer.transport.abort()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def stop(self) -> None:
        self._stopped.set()
        drop_connection(self.address)        # this process's own Worker connection, if any
        self.stop_listening()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        if self._file is not None:
            with self._lock:
                self._file.close()
                self._file = None

    # ---- one Gateway per session ----------------------------------------------------
    @classmethod
    def for_key(cls, key: str, make: Callable[[], "Gateway"]) -> "Gateway":
        """The Gateway of session ``key``, made by ``make()`` on first use."""
        with cls._registry_lock:
            gw = cls._registry.get(key)
            if gw is None or gw._stopped.is_set():
                gw = cls._registry[key] = make()
            return gw

    @classmethod
    def existing(cls, key: str) -> Optional["Gateway"]:
        with cls._registry_lock:
            return cls._registry.get(key)


def _json_object(payload: bytes) -> dict:
    """A JSON object payload; anything else (or nothing) is an empty one."""
    try:
        rec = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _frame(msg_type: int, obj: dict) -> bytes:
    payload = json.dumps(obj).encode("utf-8")
    return P.pack_header(msg_type, len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[int, bytes]:
    msg_type, length = P.unpack_header(await reader.readexactly(P.HEADER_BYTES), max_bytes)
    return msg_type, await reader.readexactly(length) if length else b""


async def _read_line(reader: asyncio.StreamReader, length: int) -> str:
    """One LOG payload as text; past LINE_CAP_BYTES the rest is read and dropped unkept."""
    if length <= LINE_CAP_BYTES:
        return (await reader.readexactly(length)).decode("utf-8", "replace")
    head = await reader.readexactly(LINE_CAP_BYTES)
    left = length - LINE_CAP_BYTES
    while left:
        left -= len(await reader.readexactly(min(left, 1 << 16)))
    return truncated(head, length)
