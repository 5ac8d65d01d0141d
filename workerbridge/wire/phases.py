"""The per-task profile line (``profile=True``): its phases, its format, its parser.

Covers: timing a child's phases (:class:`PhaseClock`), the top functions of a
``cProfile`` run, and the one LOG line a profiled task sends before
``finished``, which both children write and the driver reads back
(``profiling``, ``timeline``)::

    PyScript (3373) profile {"profiler": "cProfile", "phases": {"transfer": 0.012,
        "decode": 0.020, "closure": 0.001, "encode": 0.015, "send": 0.004},
        "functions": [["to_pandas (child_python.py:331)", 0.018, 0.020], ...]}

``functions`` holds [name, self seconds, total seconds], at most ``TOP`` of
them, by self time.  Phases: transfer (reading the input off the socket),
decode (Arrow -> pandas / data.frame), closure, encode (result -> Arrow),
send (writing it to the socket).  Standard library only: the Python child
imports it.  Does not cover: summing over tasks (``profiling``).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Optional

PREFIX = "profile "
PHASES = ("transfer", "decode", "closure", "encode", "send")
TOP = 25


class PhaseClock:
    """Seconds spent per phase; ``with clock.phase("decode"): ...`` adds to it."""

    def __init__(self):
        self.seconds = {name: 0.0 for name in PHASES}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds


def top_functions(profiler, n: int = TOP) -> list:
    """[name, self s, total s] of a stopped ``cProfile.Profile``, by self time."""
    import pstats
    stats = pstats.Stats(profiler).stats        # (file, line, fn) -> (cc, nc, tt, ct, callers)
    rows = []
    for (path, line, fn), (_cc, _nc, tt, ct, _callers) in stats.items():
        where = path.rsplit("/", 1)[-1]
        name = fn if path == "~" else f"{fn} ({where}:{line})"
        rows.append([name, round(tt, 6), round(ct, 6)])
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


def format_profile(profiler: str, seconds: dict, functions: list) -> str:
    """The message of a task's profile line."""
    return PREFIX + json.dumps({"profiler": profiler,
                                "phases": {k: round(v, 6) for k, v in seconds.items()},
                                "functions": functions}, separators=(",", ":"))


def parse_profile(message: str) -> Optional[dict]:
    """The record of a profile line's message, or None if it is not one."""
    if not message.startswith(PREFIX):
        return None
    try:
        rec = json.loads(message[len(PREFIX):])
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("phases"), dict):
        return None
    return rec
