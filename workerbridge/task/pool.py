"""Warm children: idle PyScript/RScript processes kept between the tasks of one process.

Covers: the per-process pool (keyed by language, executable, environment and
runtime files), its bounds (idle children per key and in all), the idle
timeout (a reaper thread ends children idle for longer), and ending everything
at interpreter exit.  Does not cover: when a child may go back to the pool
(the Worker decides: never after an error or a limit breach) or the protocol.

A pooled child still dies with this process: it was started with a
parent-death signal, and it sees EOF on its stdin and socket.
"""

from __future__ import annotations

import atexit
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..wire.protocol import close_quietly

MAX_IDLE_PER_KEY = 2
MAX_IDLE_TOTAL = 4


@dataclass
class Link:
    """A child with its authenticated connection: new, running a task, or
    idle in the pool between tasks."""

    child: Any                  # supervise.Child
    conn: Any                   # socket.socket
    stream: Any                 # io.BufferedReader over the socket
    reader: Any                 # worker._ChildReader
    digest: str = ""            # the closure it has loaded
    job: str = ""               # the spark_apply it last ran a task of
    tasks: int = 0              # tasks it has run
    idle_since: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        close_quietly(self.stream, self.conn)
        self.child.end(grace=0.5)
        self.child.release()


class Pool:
    def __init__(self):
        self._idle: dict[tuple, list[Link]] = {}
        self._lock = threading.Lock()
        self._reaper: Optional[threading.Thread] = None
        self.idle_timeout = 60.0

    def take(self, key: tuple) -> Optional[Link]:
        """An idle child for ``key`` that is still alive, or None."""
        while True:
            with self._lock:
                entries = self._idle.get(key)
                if not entries:
                    return None
                link = entries.pop()
            if link.child.poll() is None:
                return link
            link.close()                                   # died while idle

    def give(self, key: tuple, link: Link, idle_timeout: float) -> None:
        link.idle_since = time.monotonic()
        evicted: list[Link] = []
        with self._lock:
            self.idle_timeout = idle_timeout
            entries = self._idle.setdefault(key, [])
            entries.append(link)
            while len(entries) > MAX_IDLE_PER_KEY:
                evicted.append(entries.pop(0))
            while self.size_locked() > MAX_IDLE_TOTAL:
                oldest_key = min((k for k in self._idle if self._idle[k]),
                                 key=lambda k: self._idle[k][0].idle_since)
                evicted.append(self._idle[oldest_key].pop(0))
            self._start_reaper_locked()
        for w in evicted:
            w.close()

    def size_locked(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def size(self) -> int:
        with self._lock:
            return self.size_locked()

    def close_all(self) -> None:
        with self._lock:
            entries = [w for ws in self._idle.values() for w in ws]
            self._idle.clear()
        for w in entries:
            w.close()

    def _start_reaper_locked(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="workerbridge-pool-reaper",
                                            daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while True:
            time.sleep(max(0.1, min(1.0, self.idle_timeout / 4)))
            now = time.monotonic()
            expired: list[Link] = []
            with self._lock:
                for key, entries in list(self._idle.items()):
                    keep = [w for w in entries if now - w.idle_since <= self.idle_timeout
                            and w.child.poll() is None]
                    expired += [w for w in entries if w not in keep]
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
                empty = not self._idle
            for w in expired:
                try:
                    w.close()
                except Exception:   # noqa: BLE001 - the reaper never dies of one child
                    pass
            if empty:
                with self._lock:
                    if not self._idle:
                        self._reaper = None
                        return


POOL = Pool()
atexit.register(POOL.close_all)
