"""The Worker's backend listener: which local connection is its own child's.

Covers: accepting on the task's 127.0.0.1 port while several connections may be
half-way through the handshake at once.  Each accepted connection has a total
deadline (from its accept, not per read) to send one AUTH frame of at most
``MAX_AUTH_BYTES``; it is read without blocking, exactly its bytes (what
follows stays unread), and compared with the secret in constant time.  At most
``MAX_PENDING`` connections wait unauthenticated; a new one pushes out the
oldest, so silent local connections cannot hold the accept loop.  Waits use
``selectors`` (poll), which has no limit on fd numbers.  Does not cover: the
frames after the secret (HELLO / WELCOME, in ``worker``) or the child process.
"""

from __future__ import annotations

import hmac
import selectors
import socket
import time
from typing import Callable, Optional

from ..wire import protocol as P

MAX_PENDING = 16        # unauthenticated connections waiting at once


def new_selector() -> selectors.BaseSelector:
    """A selector without an fd limit; poll where there is one (no fd of its own)."""
    if hasattr(selectors, "PollSelector"):
        return selectors.PollSelector()
    return selectors.DefaultSelector()


class Pending:
    """One accepted connection that has not proved the secret yet."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline
        self.buf = bytearray()
        self.need = P.HEADER_BYTES           # the header first, then its payload
        sock.setblocking(False)

    def feed(self, secret: bytes) -> Optional[bool]:
        """Read what is there: True once the secret checks out, False when it
        cannot (wrong type, oversize, EOF, wrong secret), None while incomplete."""
        try:
            data = self.sock.recv(self.need - len(self.buf))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        if len(self.buf) < self.need:
            return None
        if self.need == P.HEADER_BYTES:
            try:
                msg_type, length = P.unpack_header(bytes(self.buf), P.MAX_AUTH_BYTES)
            except P.ProtocolError:                  # garbage or oversized: a stranger
                return False
            if msg_type != P.AUTH:
                return False
            self.need += length
            return None if length else hmac.compare_digest(b"", secret)
        return hmac.compare_digest(bytes(self.buf[P.HEADER_BYTES:]), secret)


def accept_child(listener: socket.socket, secret: bytes, auth_timeout: float,
                 poll_s: float, on_idle: Callable[[], None],
                 on_refused: Callable[[], None]) -> socket.socket:
    """The first connection to ``listener`` that proves ``secret``, blocking again.

    ``on_idle()`` runs at least every ``poll_s`` and raises to give up (the child
    died, the connect deadline passed); ``on_refused()`` runs for each
    connection closed unauthenticated."""
    pending: dict[socket.socket, Pending] = {}
    listener.setblocking(False)
    sel = new_selector()
    sel.register(listener, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in sel.select(poll_s):
                if key.fileobj is listener:
                    _admit(listener, sel, pending, auth_timeout, on_refused)
                    continue
                verdict = pending[key.fileobj].feed(secret)
                if verdict is None:
                    continue
                conn = key.fileobj
                _drop(sel, pending, conn, close=not verdict, on_refused=on_refused)
                if verdict:
                    conn.setblocking(True)
                    return conn
            now = time.monotonic()
            for conn in [c for c, p in pending.items() if now > p.deadline]:
                _drop(sel, pending, conn, close=True, on_refused=on_refused)
            on_idle()
    finally:
        for conn in list(pending):
            _drop(sel, pending, conn, close=True, on_refused=None)
        sel.close()


def _admit(listener, sel, pending: dict, auth_timeout: float, on_refused) -> None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    if len(pending) >= MAX_PENDING:
        oldest = min(pending, key=lambda c: pending[c].deadline)
        _drop(sel, pending, oldest, close=True, on_refused=on_refused)
    pending[conn] = Pending(conn, time.monotonic() + auth_timeout)
    sel.register(conn, selectors.EVENT_READ)


def _drop(sel, pending: dict, conn: socket.socket, close: bool, on_refused) -> None:
    sel.unregister(conn)
    del pending[conn]
    if close:
        conn.close()
        if on_refused is not None:
            on_refused()
