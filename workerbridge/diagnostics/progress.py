"""Live progress of workerbridge tasks on the driver's terminal.

Covers: :class:`Progress`, which counts partitions done (of a total, when
Spark's status tracker tells it), rows in and out and failures from the
Gateway's lines as they arrive, and draws one line with ``rich`` or ``tqdm``
when installed, else a plain ``\\r`` line; and :func:`attach`, which hooks one
such display to a session's Gateway (``spark_apply(..., progress=...)``).
Does not cover: what the lines mean beyond counting (``timeline``).

A *burst* is a run of tasks: it begins with the first ``compute starting`` line
after a quiet spell and ends when every partition is done (the total is known),
or when nothing runs any more (Spark has no active job; without Spark, nothing
arrived for ``linger`` seconds).  Then the line is finished with a newline and
the next task begins a new line.  Schema inference on the driver is not counted.

>>> import io
>>> from workerbridge.wire.logline import format_line
>>> out = io.StringIO()
>>> p = Progress(out, total=1, backend="plain")
>>> for msg in ["partition 0 compute starting", "Python process completed"]:
...     p.feed(format_line("Worker", 7, msg))
>>> out.getvalue().rsplit("\\r", 1)[-1].split(" | ")[:2]
['workerbridge [##############################] 1/1 partitions', 'rows 0 in, 0 out']
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import Callable, Optional

from ..wire.lifecycle import SCRIPT_ROLES, read
from ..wire.logline import parse_line

BACKENDS = ("auto", "rich", "tqdm", "plain")


class _Burst:
    def __init__(self, total: Optional[int]):
        self.began = time.monotonic()
        self.total = total
        self.started = self.done = self.rows_in = self.rows_out = 0
        self.failed: set = set()
        self.incomplete = 0

    @property
    def running(self) -> int:
        return max(self.started - self.done, 0)

    def text(self, width: int = 30) -> str:
        failed = len(self.failed) + self.incomplete
        if self.total:
            filled = min(width, width * self.done // self.total)
            head = f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} partitions"
        else:
            head = f"{self.done} partitions done, {self.running} running"
        return (f"workerbridge {head} | rows {self.rows_in} in, {self.rows_out} out | "
                f"{failed} failed | {time.monotonic() - self.began:.1f} s")


class _Plain:
    """One line, rewritten in place with a carriage return."""

    def __init__(self, stream):
        self.stream, self.width = stream, 0

    def update(self, run: _Burst) -> None:
        text = run.text()
        self.stream.write("\r" + text + " " * max(self.width - len(text), 0))
        self.stream.flush()
        self.width = len(text)

    def close(self, run: _Burst) -> None:
        self.update(run)
        self.stream.write("\n")
        self.stream.flush()
        self.width = 0


class _Tqdm:
    def __init__(self, stream):
        from tqdm import tqdm
        self._tqdm, self.stream, self.bar = tqdm, stream, None

    def update(self, run: _Burst) -> None:
        if self.bar is None:
            self.bar = self._tqdm(total=run.total, desc="workerbridge", unit="partition",
                                  file=self.stream, leave=True, dynamic_ncols=True)
        self.bar.total = run.total
        self.bar.n = run.done
        self.bar.set_postfix_str(f"rows {run.rows_in} in, {run.rows_out} out, "
                                 f"{len(run.failed) + run.incomplete} failed", refresh=False)
        self.bar.refresh()

    def close(self, run: _Burst) -> None:
        self.update(run)
        self.bar.close()
        self.bar = None


class _Rich:
    def __init__(self, stream):
        from rich.console import Console
        self.console, self.live = Console(file=stream), None

    def update(self, run: _Burst) -> None:
        from rich.live import Live
        if self.live is None:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        self.live.update(run.text(), refresh=True)

    def close(self, run: _Burst) -> None:
        self.update(run)
        self.live.stop()
        self.live = None


def _renderer(stream, backend: str):
    order = ("rich", "tqdm", "plain") if backend == "auto" else (backend,)
    for name in order:
        try:
            return {"rich": _Rich, "tqdm": _Tqdm, "plain": _Plain}[name](stream)
        except ImportError:
            if backend != "auto":
                raise
    return _Plain(stream)


class Progress:
    """Counts lines into a live line on ``stream``; feed it with :meth:`feed`.

    ``total``: partitions expected, or ``total_fn()`` asked when a run begins
    (None: unknown).  ``idle_fn()`` says whether the engine has stopped running
    tasks (e.g. Spark has no active job); without it, ``linger`` quiet seconds do.
    """

    def __init__(self, stream=None, total: Optional[int] = None,
                 total_fn: Optional[Callable[[], Optional[int]]] = None,
                 idle_fn: Optional[Callable[[], bool]] = None, backend: str = "auto",
                 linger: float = 1.0, min_interval: float = 0.1):
        if backend not in BACKENDS:
            raise ValueError(f"backend= must be one of {BACKENDS}, not {backend!r}")
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = True
        self._total, self._total_fn, self._idle_fn = total, total_fn, idle_fn
        self._renderer = _renderer(self.stream, backend)
        self.linger, self.min_interval = linger, min_interval
        self._lock = threading.RLock()
        self._run: Optional[_Burst] = None
        self._drawn = 0.0
        self._heard = time.monotonic()
        self._ticker: Optional[threading.Thread] = None
        self.finished_runs = 0

    # ---- input -------------------------------------------------------------------------
    def feed(self, line: str) -> None:
        """Count one Gateway line (never raises)."""
        try:
            self._feed(line)
        except Exception:             # progress never breaks a job
            pass

    def _feed(self, line: str) -> None:
        rec = parse_line(line)
        if rec is None or rec["id"].startswith("driver-") or rec["role"] == "Gateway":
            return
        role, msg = rec["role"], rec["message"]
        with self._lock:
            self._heard = time.monotonic()
            run = self._run
            empty = role == "Worker" and read("empty", msg) is not None
            if empty or (role == "Worker" and read("start", msg)):
                if run is None:
                    if not self.enabled:
                        return
                    run = self._run = _Burst(self._total if self._total else self._ask_total())
                    self._start_ticker()
                elif run.total is not None and run.started >= run.total and self._total is None:
                    run.total = self._ask_total()     # more tasks than we thought: ask again
                run.started += 1
                if empty:
                    run.done += 1
            elif run is None:
                return
            elif role == "Worker" and read("completed", msg):
                run.done += 1
            elif role in SCRIPT_ROLES and read("retrieved", msg):
                run.rows_in += int(read("retrieved", msg)["rows"])
            elif role in SCRIPT_ROLES and read("returned", msg):
                run.rows_out += int(read("returned", msg)["rows"])
            if rec["level"] == "ERROR":
                run.failed.add(rec["id"])
            if run.total is not None and run.done >= run.total and run.running == 0:
                self._finish()
            else:
                self._draw()

    def _ask_total(self) -> Optional[int]:
        if self._total_fn is None:
            return None
        try:
            n = self._total_fn()
            return int(n) if n else None
        except Exception:
            return None

    # ---- output -------------------------------------------------------------------------
    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._run is not None and (force or now - self._drawn >= self.min_interval):
            self._drawn = now
            self._renderer.update(self._run)

    def _finish(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            self._renderer.close(run)
            self.finished_runs += 1

    def close(self) -> None:
        """End the current line, if a run is showing."""
        with self._lock:
            self._finish()

    def _start_ticker(self) -> None:
        if self._ticker is not None and self._ticker.is_alive():
            return
        self._ticker = threading.Thread(target=self._tick, name="workerbridge-progress",
                                        daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        """Redraws (the clock moves) and ends a run once nothing runs any more."""
        while True:
            time.sleep(0.25)
            with self._lock:
                run = self._run
                if run is None:
                    return
                quiet = time.monotonic() - self._heard
            idle = None
            if self._idle_fn is not None and quiet >= 0.25:
                try:
                    idle = bool(self._idle_fn())
                except Exception:
                    idle = None
            with self._lock:
                if self._run is not run:
                    continue
                if idle or (idle is None and run.running == 0 and quiet >= self.linger):
                    run.incomplete = run.running if idle else 0
                    run.started -= run.incomplete
                    self._finish()
                else:
                    self._draw(force=True)


# ---- one display per Gateway ----------------------------------------------------------------
_displays: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_displays_lock = threading.Lock()


def wanted(value: Optional[bool], stream=None) -> bool:
    """``progress=`` parsed: None (auto: on for a terminal), True or False.

    >>> wanted(False), wanted(True), wanted(None, stream=__import__("io").StringIO())
    (False, True, False)
    """
    if value is not None:
        return bool(value)
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def attach(gateway, spark=None, progress=None, stream=None) -> Optional[Progress]:
    """The session's display on ``gateway``, created on first use; off when not ``wanted``.

    The latest ``spark_apply`` call decides whether the display is on.
    """
    on = wanted(progress, stream)
    with _displays_lock:
        display = _displays.get(gateway)
        if display is None:
            if not on:
                return None
            sc = _spark_context(spark)
            display = Progress(stream, total_fn=(lambda: _stage_tasks(sc)) if sc else None,
                               idle_fn=(lambda: not sc.statusTracker().getActiveJobsIds())
                               if sc else None)
            gateway.subscribe(display.feed)
            _displays[gateway] = display
        display.enabled = on
    return display


def _spark_context(spark):
    try:
        return spark.sparkContext if spark is not None else None
    except Exception:                      # Spark Connect: no SparkContext, no tracker
        return None


def _stage_tasks(sc) -> Optional[int]:
    """Tasks of Spark's active stages: the partitions being run right now."""
    tracker = sc.statusTracker()
    infos = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
    return sum(i.numTasks for i in infos if i is not None) or None
