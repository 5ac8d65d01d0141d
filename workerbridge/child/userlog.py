"""Logging from inside a Python closure: ``workerbridge.log("...")``.

Covers: the function users call and the hook the PyScript child installs so
that a call becomes a ``PyClosure`` line in ``spark_log``.  Outside a child
(for instance when a closure is tried locally) the line goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from ..wire.logline import LEVELS

_sender: Optional[Callable[[str, str], None]] = None


def install(sender: Callable[[str, str], None]) -> None:
    global _sender
    _sender = sender


def log(message: object, level: str = "INFO") -> None:
    """Send one line to the driver's log as ``PyClosure``.

    >>> log("hello from outside a child")   # doctest: +SKIP
    """
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"level must be DEBUG, INFO, WARN or ERROR, not {level!r}")
    if _sender is None:
        sys.stderr.write(f"PyClosure {level}: {message}\n")
    else:
        _sender(str(message), level)
