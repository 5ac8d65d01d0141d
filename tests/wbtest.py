"""Helpers shared by the tests."""

from __future__ import annotations

import psutil


def child_processes() -> set:
    """Our children: PyScript / RScript processes anywhere below this test process."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "workerbridge.child_python" in cmd or "child.R" in cmd:
            found.add(p.pid)
    return found
