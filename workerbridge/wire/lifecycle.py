"""The lifecycle vocabulary: every line a Worker or a child writes about a task.

Covers: the two languages (:data:`LANGUAGES`: the closure's language key, its
name in messages, the child's role and the closure's role in the log), and
:data:`MESSAGES`, one entry per lifecycle line with the template that writes it
and the pattern that reads it back.  Writers (``task.worker``, ``child.python``)
and readers (``diagnostics``) both use this table, so rewording a line cannot
silently break progress or the timeline.  The R child holds the same table
(``rscripts/protocol.R``, ``WB_LIFECYCLE``); a test holds the two equal.

>>> MESSAGES["retrieved"].format(rows=150)
'retrieved 150 rows'
>>> MESSAGES["applied"].match("applied closure to 150 rows in 3 groups")["groups"]
'3'
>>> language_of("r").role
'RScript'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Language:
    key: str            # what a Closure names its language by
    name: str           # in messages: "R process completed"
    role: str           # the child's role in the log
    closure_role: str   # lines the user's closure logs


LANGUAGES = {
    "python": Language("python", "Python", "PyScript", "PyClosure"),
    "r": Language("r", "R", "RScript", "RClosure"),
}
SCRIPT_ROLES = tuple(lang.role for lang in LANGUAGES.values())


def language_of(key: str) -> Language:
    return LANGUAGES[key]


def language_by_role(role: str) -> Optional[Language]:
    return next((lang for lang in LANGUAGES.values() if lang.role == role), None)


@dataclass(frozen=True)
class Message:
    """One lifecycle line: ``template`` writes it (``{field}`` placeholders),
    ``pattern`` reads it (named groups), ``writer`` says who writes it."""

    name: str
    writer: str         # "Worker" or "child" (PyScript / RScript)
    template: str
    pattern: str

    def format(self, **fields) -> str:
        return self.template.format(**fields)

    def match(self, text: str) -> Optional[dict]:
        m = re.match(self.pattern, text)
        return m.groupdict() if m else None


_MESSAGES = [
    Message("start", "Worker", "partition {partition} compute starting{label}",
            r"^partition (?P<partition>\S+) compute starting"),
    Message("empty", "Worker", "partition {partition} is empty; no child started",
            r"^partition (?P<partition>\S+) is empty"),
    Message("started", "Worker", "started {role} (pid {pid})",
            r"^(?P<how>started) (?P<role>PyScript|RScript) \(pid (?P<pid>\d+)\)"),
    Message("reused", "Worker", "reused {role} (pid {pid}) after {tasks} tasks",
            r"^(?P<how>reused) (?P<role>PyScript|RScript) \(pid (?P<pid>\d+)\)"),
    Message("waiting", "Worker", "is waiting for {role} to connect to port {port}",
            r"^is waiting for (?P<role>\S+) to connect to port (?P<port>\d+)"),
    Message("completed", "Worker", "{language} process completed",
            r"^(?P<language>Python|R) process completed"),
    Message("kept", "Worker", "kept {role} (pid {pid}) warm for reuse",
            r"^kept (?P<role>\S+) \(pid (?P<pid>\d+)\) warm"),
    Message("failed", "Worker", "partition {partition} failed: {what}",
            r"^partition (?P<partition>\S+) failed: (?P<what>.*)$"),
    Message("connected", "child", "is connected to backend", r"^is connected to backend$"),
    Message("loaded", "child", "loaded closure {digest} ({size} bytes)",
            r"^loaded closure (?P<digest>\S+) \((?P<size>\d+) bytes\)"),
    Message("retrieved", "child", "retrieved {rows} rows", r"^retrieved (?P<rows>\d+) rows$"),
    Message("columns", "child", "retrieved {columns} column names",
            r"^retrieved (?P<columns>\d+) column names$"),
    Message("applied", "child", "applied closure to {rows} rows{detail}",
            r"^applied closure to (?P<rows>\d+) rows(?: in (?P<groups>\d+) groups)?"
            r"(?: in (?P<batches>\d+) batches)?"),
    Message("returned", "child", "returned {rows} rows", r"^returned (?P<rows>\d+) rows$"),
    Message("finished", "child", "finished", r"^finished$"),
]
MESSAGES = {m.name: m for m in _MESSAGES}


def line(name: str, **fields) -> str:
    """The message text of lifecycle line ``name``.

    >>> line("completed", language="R")
    'R process completed'
    """
    return MESSAGES[name].format(**fields)


def read(name: str, text: str) -> Optional[dict]:
    """The fields of ``text`` read as lifecycle line ``name``, or None."""
    return MESSAGES[name].match(text)
