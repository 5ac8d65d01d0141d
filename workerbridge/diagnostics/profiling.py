"""``workerbridge.profile(spark)``: the profiles of ``profile=True`` tasks, summed.

Covers: reading the session's profile lines (see ``phases``) out of the
Gateway, and printing the time split over all profiled tasks (spawn,
transfer, decode, closure, encode, send, and the rest of the task's wall
time: the Worker's own work and waits) and the top functions by self time,
per profiler (cProfile for PyScript, Rprof for RScript).  Does not cover:
making the profiles (the children), drawing them (``timeline``).

>>> from workerbridge.wire.logline import format_line
>>> from workerbridge.wire.phases import format_profile
>>> from workerbridge.diagnostics.tasks import tasks_from_events
>>> line = format_profile("Rprof", {"transfer": 0.1, "decode": 0.2, "closure": 0.05,
...                                  "encode": 0.1, "send": 0.05}, [["readBin", 0.2, 0.3]])
>>> events = [(0.0, format_line("Worker", 7, "partition 0 compute starting")),
...           (0.3, format_line("RScript", 7, "is connected to backend")),
...           (0.9, format_line("RScript", 7, line)),
...           (1.0, format_line("Worker", 7, "R process completed"))]
>>> s = summarize(tasks_from_events(events))
>>> s.tasks, round(s.phases["spawn"], 2), round(s.phases["other"], 2)
(1, 0.3, 0.2)
>>> s.functions[0]
('Rprof', 'readBin', 0.2, 0.3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..wire.phases import PHASES
from .tasks import TaskRecord

SPLIT = ("spawn",) + PHASES + ("other",)


@dataclass
class ProfileSummary:
    """Profiled tasks summed: ``phases`` (seconds by phase) and ``functions``
    ((profiler, function, self s, total s), by self time)."""

    tasks: int = 0
    wall: float = 0.0
    phases: dict = field(default_factory=lambda: {k: 0.0 for k in SPLIT})
    functions: list = field(default_factory=list)
    top: int = 15

    def __str__(self) -> str:
        if not self.tasks:
            return ("workerbridge profile: no profiled task in this session "
                    "(run spark_apply(..., profile=True) first)")
        out = [f"workerbridge profile: {self.tasks} tasks, {self.wall:.3f} s of task wall time",
               f"{'phase':<10}{'seconds':>10}{'share':>8}"]
        for name in SPLIT:
            secs = self.phases[name]
            share = 100 * secs / self.wall if self.wall else 0.0
            out.append(f"{name:<10}{secs:>10.3f}{share:>7.1f}%")
        out.append(f"top functions by self time, summed over tasks "
                   f"({'/'.join(sorted({f[0] for f in self.functions})) or 'none'}):")
        for prof, name, self_s, total_s in self.functions[:self.top]:
            out.append(f"  {self_s:>8.3f} s self {total_s:>8.3f} s total  [{prof}] {name}")
        return "\n".join(out)


def summarize(tasks: list[TaskRecord], top: int = 15) -> ProfileSummary:
    """The profiled runs among ``tasks``, summed."""
    summary = ProfileSummary(top=top)
    funcs: dict = {}
    for task in tasks:
        if task.profile is None:
            continue
        summary.tasks += 1
        wall = task.end - task.start
        summary.wall += wall
        spawn = task.times["connected"] - task.start if "connected" in task.times else 0.0
        measured = spawn
        summary.phases["spawn"] += spawn
        for name in PHASES:
            secs = float(task.profile["phases"].get(name) or 0.0)
            summary.phases[name] += secs
            measured += secs
        summary.phases["other"] += max(0.0, wall - measured)
        prof = str(task.profile.get("profiler", "?"))
        for row in task.profile.get("functions") or []:
            try:
                name, self_s, total_s = str(row[0]), float(row[1]), float(row[2])
            except (TypeError, ValueError, IndexError):
                continue
            acc = funcs.setdefault((prof, name), [0.0, 0.0])
            acc[0] += self_s
            acc[1] += total_s
    summary.functions = sorted(((p, n, s, t) for (p, n), (s, t) in funcs.items()),
                               key=lambda r: -r[2])
    return summary
