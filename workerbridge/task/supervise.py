"""Child processes: start one, name how it ended, end its whole tree.

Covers: spawning with the secret on stdin (never argv, never the environment),
stderr captured to a file whose tail goes into error messages, the exit-code
names (``SIGSEGV(-11)``), and termination with a budget: ask (SIGTERM), wait,
kill every descendant (SIGKILL), confirm gone.  Does not cover: the socket or
the protocol (``worker``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import psutil

TERM_GRACE_S = 2.0      # after SIGTERM, how long the tree may take to leave
KILL_CONFIRM_S = 3.0    # after SIGKILL, how long until we call it a leak
STDERR_TAIL_BYTES = 4000


def exit_name(code: Optional[int]) -> str:
    """``0`` → ``'0'``, ``-11`` → ``'SIGSEGV(-11)'``, ``None`` → ``'still running'``.

    >>> exit_name(-11)
    'SIGSEGV(-11)'
    >>> exit_name(3)
    '3'
    """
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal({code})"
    return str(code)


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def with_parent_death_signal(argv: Sequence[str]) -> list:
    """``argv`` run so that the kernel kills it when its parent dies
    (``PR_SET_PDEATHSIG`` through util-linux ``setpriv``, which then execs, so the
    pid is the child's own).  Without setpriv, ``argv`` unchanged: the children
    also exit on EOF of their stdin or socket."""
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def parse_bytes(text) -> int:
    """``"2GB"`` → 2147483648; ints pass through.

    >>> parse_bytes("512MB"), parse_bytes("1.5g"), parse_bytes(1024)
    (536870912, 1610612736, 1024)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a size: {text!r} (write e.g. '512MB' or '2GB')")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class Child:
    """One child process, its stderr file, and its tree."""

    def __init__(self, argv: Sequence[str], env: dict, secret: str, cwd: Optional[str] = None):
        self.argv = with_parent_death_signal(argv)
        self._stderr = tempfile.TemporaryFile(prefix="workerbridge-stderr-")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=self._stderr, stderr=self._stderr,
            env=env, cwd=cwd, close_fds=True)
        self.pid = self.proc.pid
        try:
            # The secret, then the pipe stays open: EOF on it tells the child
            # that its Worker is gone.
            self.proc.stdin.write(secret.encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass                         # it died already; poll() will say how

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    def stderr_tail(self, limit: int = STDERR_TAIL_BYTES) -> str:
        try:
            self._stderr.flush()
            size = os.fstat(self._stderr.fileno()).st_size
            with open(self._stderr.fileno(), "rb", closefd=False) as f:
                f.seek(max(0, size - limit))
                text = f.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return ("…" if size > limit else "") + text.strip()

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def end(self, grace: float = TERM_GRACE_S) -> list[int]:
        """End the child and all its descendants; return pids that would not die.

        Budget: SIGTERM to the tree, ``grace`` seconds, SIGKILL to what is left,
        then up to ``KILL_CONFIRM_S`` to confirm.
        """
        self.close_stdin()
        tree = descendants(self.pid)
        try:
            tree.insert(0, psutil.Process(self.pid))
        except psutil.NoSuchProcess:
            pass
        alive = [p for p in tree if _send(p, signal.SIGTERM)] if grace > 0 else tree
        if alive and grace > 0:
            _, alive = psutil.wait_procs(alive, timeout=grace)
        for p in alive:
            _send(p, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=KILL_CONFIRM_S)
        self.proc.poll()                                  # reap, so no zombie
        if self.proc.returncode is None:
            self.wait(KILL_CONFIRM_S)
        return [p.pid for p in alive]

    def release(self) -> None:
        """Close the stderr file; call after the last :meth:`stderr_tail`."""
        try:
            self._stderr.close()
        except OSError:
            pass


def descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _send(p, sig) -> bool:
    try:
        p.send_signal(sig)
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
