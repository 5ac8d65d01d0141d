"""The log-line format: a contract that tests, tools and users parse.

Covers: :func:`format_line` and :func:`parse_line`, the roles and levels a line
may carry, :func:`level_of` for the level a line is filed under, the cap on a
line's length (:func:`cap_line`) and the logger name Spark's Python worker
logging collects lines from (``SPARK_LOGGER``).  Does not
cover: the words of the lifecycle lines (``lifecycle``) or sending them
(``task.logsink``).

Format, exactly::

    yy/MM/dd HH:mm:ss LEVEL workerbridge: <Role> (<id>) <message>
"""

from __future__ import annotations

import re
import time
from typing import Optional

LINE_CAP_BYTES = 64 * 1024            # a longer line is cut, and says so
SPARK_LOGGER = "workerbridge.lines"   # the logger Spark's worker logging (4.1+) collects
ROLES = ("Gateway", "Worker", "PyScript", "RScript", "PyClosure", "RClosure")
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")

# The ids of schema-sample tasks on the driver: numbers too (the format says
# so), counted up from here, far above Spark's task attempt ids.
SAMPLE_ID_BASE = 10**12

LINE_RE = re.compile(
    r"^(?P<date>\d{2}/\d{2}/\d{2}) (?P<time>\d{2}:\d{2}:\d{2}) (?P<level>DEBUG|INFO|WARN|ERROR) "
    r"workerbridge: (?P<role>" + "|".join(ROLES) + r") \((?P<id>[^)]+)\) (?P<message>.*)$")


def format_line(role: str, ident: object, message: str, level: str = "INFO",
                when: Optional[float] = None) -> str:
    """One log line; newlines in ``message`` are folded so a line stays a line.

    >>> format_line("Worker", 7, "partition 0 compute starting", when=0)[18:]
    'INFO workerbridge: Worker (7) partition 0 compute starting'
    """
    stamp = time.strftime("%y/%m/%d %H:%M:%S", time.localtime(time.time() if when is None else when))
    text = " | ".join(part for part in str(message).splitlines()) or ""
    return f"{stamp} {level} workerbridge: {role} ({ident}) {text}"


def is_sample_id(ident: object) -> bool:
    """Whether a line's id is a schema-sample task's (on the driver).

    >>> is_sample_id(SAMPLE_ID_BASE + 1), is_sample_id("3373")
    (True, False)
    """
    text = str(ident)
    return text.isdigit() and int(text) >= SAMPLE_ID_BASE


def truncated(head: bytes, total: int) -> str:
    """The start of a line that was ``total`` bytes long, with a marker saying so."""
    return (head.decode("utf-8", "ignore")
            + f" ... [line truncated: {total} bytes, the first {len(head)} kept]")


def cap_line(line: str) -> str:
    """``line`` if it fits LINE_CAP_BYTES as UTF-8, else its start and a marker (which fit)."""
    data = line.encode("utf-8")
    if len(data) <= LINE_CAP_BYTES:
        return line
    return truncated(data[:LINE_CAP_BYTES - 100], len(data))


def parse_line(line: str) -> Optional[dict]:
    """The fields of a line in the format above, or None."""
    m = LINE_RE.match(line)
    return m.groupdict() if m else None


def level_of(level: object) -> str:
    """``level`` when it is one of :data:`LEVELS`, else INFO (a child's or an old
    Worker's line is never dropped for its level)."""
    return level if level in LEVELS else "INFO"
