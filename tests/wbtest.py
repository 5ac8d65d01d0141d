"""Helpers shared by the tests."""

from __future__ import annotations

import psutil

from workerbridge.task.runtime import Runtime
from workerbridge.task.worker import CHILD_MODULE

# The package's files, laid out once, for tests that run a Worker directly.
RUNTIME = Runtime.collect(with_r=True)
ROOT = str(RUNTIME.materialize())


def child_processes() -> set:
    """Our children: PyScript / RScript processes anywhere below this test process."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if CHILD_MODULE in cmd or "child.R" in cmd:
            found.add(p.pid)
    return found
