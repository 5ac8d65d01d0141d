"""The task model: what each task did, read back from its lifecycle lines.

Covers: :class:`TaskRecord` (one Worker's run of one partition: its phase
boundaries, rows, child, errors), folding lines into records
(:func:`apply_line`, :func:`tasks_from_events`) and reading a log file's lines
with their one-second stamps (:func:`events_from_log`).  The words of the
lines come from ``wire.lifecycle``.  Used by ``progress`` and ``timeline``.

Phases of one task, from its lines::

    spawn    Worker "partition N compute starting"  -> PyScript "is connected to backend"
    receive  "is connected to backend"               -> "retrieved N rows"
    apply    "retrieved N rows"                      -> "applied closure to N rows"
    send     "applied closure ..."                   -> "finished"

>>> from workerbridge.wire.logline import format_line
>>> lines = [format_line("Worker", 9, "partition 1 compute starting"),
...          format_line("PyScript", 9, "is connected to backend"),
...          format_line("PyScript", 9, "retrieved 34 rows"),
...          format_line("PyScript", 9, "applied closure to 34 rows"),
...          format_line("PyScript", 9, "returned 34 rows"),
...          format_line("PyScript", 9, "finished"),
...          format_line("Worker", 9, "Python process completed")]
>>> [task] = tasks_from_events(list(zip([0.0, 0.4, 0.5, 0.9, 0.95, 1.0, 1.1], lines)))
>>> task.label, task.rows_in, task.rows_out, task.completed
('partition 1 (task 9)', 34, 34, True)
>>> [(name, round(b - a, 2)) for name, a, b in task.phases()]
[('spawn', 0.4), ('receive', 0.1), ('apply', 0.4), ('send', 0.1)]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..wire.lifecycle import SCRIPT_ROLES, language_by_role, read
from ..wire.logline import parse_line

PHASES = ("spawn", "receive", "apply", "send")
# boundary names in order; phase i runs from BOUNDARIES[i] to BOUNDARIES[i + 1]
BOUNDARIES = ("start", "connected", "retrieved", "applied", "finished")


@dataclass
class TaskRecord:
    """One Worker's run of one partition, as its log lines tell it."""

    id: str
    partition: Optional[str] = None
    language: Optional[str] = None           # "Python" or "R"
    times: dict = field(default_factory=dict)  # boundary / "completed" -> epoch seconds
    rows_in: Optional[int] = None
    rows_out: Optional[int] = None
    groups: Optional[int] = None
    pid: Optional[int] = None
    reused: bool = False
    empty: bool = False
    error: Optional[str] = None
    last: float = 0.0                         # time of the task's last line

    @property
    def completed(self) -> bool:
        return "completed" in self.times

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def on_driver(self) -> bool:
        return self.id.startswith("driver-")

    @property
    def start(self) -> float:
        return self.times.get("start", self.last)

    @property
    def end(self) -> float:
        return max([self.last] + list(self.times.values()))

    @property
    def label(self) -> str:
        part = "schema sample" if self.partition == "sample" else f"partition {self.partition}"
        return f"{part} (task {self.id})"

    def phases(self) -> list[tuple[str, float, float]]:
        """(phase, start, end) in epoch seconds, for the phases the lines show.

        A missing boundary (a reused child has no "connected") folds its phase
        into the next one; a task that failed or has not finished gets its
        unfinished phase drawn up to its last line.
        """
        out = []
        prev = self.times.get("start")
        if prev is None:
            return out
        for i, name in enumerate(PHASES):
            nxt = self.times.get(BOUNDARIES[i + 1])
            if nxt is None:
                continue
            out.append((name, prev, nxt))
            prev = nxt
        if "finished" not in self.times and self.last > prev:
            done = {n for n, _, _ in out}
            pending = [n for i, n in enumerate(PHASES)
                       if n not in done and BOUNDARIES[i + 1] not in self.times]
            if pending:
                out.append((pending[0], prev, self.last))
        return out


def _new_record(records: dict, ident: str, t: float) -> TaskRecord:
    record = TaskRecord(ident, last=t)
    records.setdefault(ident, []).append(record)
    return record


def _record_for(records: dict, ident: str, t: float, key: Optional[str] = None) -> TaskRecord:
    """The first record of ``ident`` that still lacks ``key`` (several Workers can share
    one Spark task when spark_apply calls are chained), else its newest one."""
    found = records.get(ident) or [_new_record(records, ident, t)]
    if key is not None:
        for record in found:
            if key not in record.times:
                return record
    return found[-1]


def apply_line(records: dict, t: float, text: str) -> Optional[TaskRecord]:
    """Fold one line into ``records`` (id -> [TaskRecord]); the record it touched, or None."""
    rec = parse_line(text)
    if rec is None or rec["role"] == "Gateway":
        return None
    ident, role, msg = rec["id"], rec["role"], rec["message"]
    if role == "Worker":
        record = _worker_line(records, ident, t, msg)
    elif role in SCRIPT_ROLES:
        record = _child_line(records, ident, t, msg)
    else:
        record = None
    if rec["level"] == "ERROR":
        record = record or _record_for(records, ident, t)
        record.error = record.error or f"{role}: {msg}"
    if record is None and ident in records:
        record = records[ident][-1]
    if record is not None:
        record.last = max(record.last, t)
    return record


def _worker_line(records: dict, ident: str, t: float, msg: str) -> Optional[TaskRecord]:
    start, empty = read("start", msg), read("empty", msg)
    if start or empty:
        record = _new_record(records, ident, t)
        record.partition = (start or empty)["partition"]
        if start:
            record.times["start"] = t
        record.empty = empty is not None
        return record
    child = read("started", msg) or read("reused", msg)
    if child:
        record = _record_for(records, ident, t, "child")
        record.times["child"] = t
        record.language = language_by_role(child["role"]).name
        record.pid, record.reused = int(child["pid"]), child["how"] == "reused"
        return record
    done = read("completed", msg)
    if done:
        record = _record_for(records, ident, t, "completed")
        record.times["completed"] = t
        record.language = record.language or done["language"]
        return record
    return None


def _child_line(records: dict, ident: str, t: float, msg: str) -> Optional[TaskRecord]:
    for boundary in ("connected", "retrieved", "applied", "returned", "finished"):
        fields = read(boundary, msg)
        if fields is None:
            continue
        record = _record_for(records, ident, t, boundary)
        record.times[boundary] = t
        if boundary == "retrieved":
            record.rows_in = int(fields["rows"])
        elif boundary == "returned":
            record.rows_out = int(fields["rows"])
        elif boundary == "applied" and fields.get("groups"):
            record.groups = int(fields["groups"])
        return record
    return None


def tasks_from_events(events: Iterable[tuple[float, str]], include_empty: bool = False
                      ) -> list[TaskRecord]:
    """The task records in ``events`` ((epoch seconds, line) pairs), by start time."""
    records: dict = {}
    for t, text in events:
        apply_line(records, t, text)
    found = [r for rs in records.values() for r in rs
             if "start" in r.times or (include_empty and r.empty)]
    return sorted(found, key=lambda r: (r.start, str(r.id)))


def events_from_log(lines: Iterable[str]) -> list[tuple[float, str]]:
    """(epoch seconds, line) from a log file's lines: the stamp is to the second.

    >>> events_from_log(["not a line", "26/11/21 23:55:30 INFO workerbridge: Worker (9) x"])[0][1]
    '26/11/21 23:55:30 INFO workerbridge: Worker (9) x'
    """
    out = []
    for line in lines:
        line = line.rstrip("\n")
        rec = parse_line(line)
        if rec is None:
            continue
        stamp = time.mktime(time.strptime(f"{rec['date']} {rec['time']}", "%y/%m/%d %H:%M:%S"))
        out.append((stamp, line))
    return out
