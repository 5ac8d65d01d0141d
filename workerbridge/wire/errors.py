"""The errors workerbridge raises, one type per kind of failure.

Covers: :class:`ClosureError` (the user's code raised; carries the child's own
traceback), :class:`TransportError` (the socket or the stream broke, or a peer
broke the protocol), :class:`ChildDiedError` (the child exited or was killed;
carries the exit code's name and the stderr tail), :class:`LimitError` (a
limit was breached) and :class:`BadInputError` (caught on the driver before any
job runs).  Each message names the partition, the language and a hint, because
inside Spark only the message text reaches the driver.
"""

from __future__ import annotations

from typing import Optional

# How to get R where it is missing: every "Rscript not found" says this.
R_INSTALL_HINT = "install R (Debian: apt-get install r-base-core)"


class WorkerBridgeError(Exception):
    """Base of every workerbridge error."""


class BadInputError(WorkerBridgeError, ValueError):
    """Arguments that cannot work, found on the driver before a job runs."""


class TaskError(WorkerBridgeError):
    """A task failed; ``partition``, ``language`` and ``role`` say where."""

    kind = "task"

    def __init__(self, what: str, *, partition: object, language: str, role: str,
                 detail: str = "", hint: str = ""):
        self.what = what
        self.partition = partition
        self.language = language
        self.role = role
        self.detail = detail
        self.hint = hint
        text = f"{role} ({language}) failed in partition {partition}: {what}"
        if detail:
            text += "\n" + detail.rstrip()
        if hint:
            text += f"\nHint: {hint}"
        super().__init__(text)

    def attach_log(self, lines: list) -> None:
        """Carry the task's own log lines in the message: the driver gets them even when
        no line could reach its Gateway."""
        self.log_lines = list(lines)
        if lines:
            self.args = (f"{self.args[0]}\nthe task's log lines (newest {len(lines)}):\n"
                         + "\n".join(lines),)


class ClosureError(TaskError):
    """The user's closure raised; ``remote_traceback`` is the child's own."""

    kind = "closure"

    def __init__(self, *, error_type: str, message: str, remote_traceback: str,
                 call: Optional[str] = None, **kw):
        self.error_type = error_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.call = call
        what = f"{error_type}: {message}" + (f" (in call: {call})" if call else "")
        detail = f"the child's own traceback:\n{remote_traceback}" if remote_traceback else ""
        super().__init__(what, detail=detail, **kw)


class TransportError(TaskError):
    """The connection to the child broke, or the child broke the protocol."""

    kind = "transport"


class ChildDiedError(TaskError):
    """The child process ended without finishing its task."""

    kind = "child-died"

    def __init__(self, what: str, *, exit_code: Optional[int], stderr_tail: str, **kw):
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        detail = f"stderr tail:\n{stderr_tail}" if stderr_tail else "stderr was empty"
        super().__init__(what, detail=detail, **kw)


class LimitError(ChildDiedError):
    """The child breached a limit (timeout, memory) and was ended."""

    kind = "limit"
