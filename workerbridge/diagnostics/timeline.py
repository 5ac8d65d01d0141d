"""The task timeline: one horizontal bar per task, split into its lifecycle phases.

Covers: drawing task records (``diagnostics.tasks``) as a self-contained HTML
page (inline SVG, needs nothing) or a PNG (matplotlib, the ``ui`` extra).  Does
not cover: reading the lines (``tasks``) or finding a session's lines
(``driver.api.timeline``).

A phase too short to see is widened to a couple of pixels (the phases after it
move right by as much), so every phase of every task shows.

>>> from workerbridge.diagnostics.tasks import TaskRecord
>>> task = TaskRecord("9", partition="1", times={"start": 0.0, "connected": 0.4,
...                   "retrieved": 0.5, "applied": 0.9, "finished": 1.0, "completed": 1.1})
>>> "<rect" in render_html([task])
True
"""

from __future__ import annotations

import html
import os
import sys
import time
from typing import Optional

from .tasks import PHASES, TaskRecord

PHASE_TITLES = {
    "spawn": "spawn (start → child connected)",
    "receive": "connect/receive (connected → rows retrieved)",
    "apply": "apply (the closure)",
    "send": "send (result → finished)",
}
COLORS = {"spawn": "#4e79a7", "receive": "#f28e2b", "apply": "#59a14f", "send": "#e15759"}
FAILED_COLOR = "#000000"


def write_timeline(tasks: list[TaskRecord], path: str, title: Optional[str] = None) -> str:
    """Draw ``tasks`` to ``path``; the path written.

    ``.png`` is drawn with matplotlib (the ``ui`` extra).  Without matplotlib the
    HTML page is written beside it (``.html``) and one line on stderr says so;
    anything else is written as a self-contained HTML page (inline SVG).
    """
    title = title or title_of(tasks)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if str(path).lower().endswith(".png"):
        if _has_matplotlib():
            _png_matplotlib(tasks, path, title)
            return str(path)
        path = str(path)[:-4] + ".html"
        sys.stderr.write(f"workerbridge: matplotlib is not installed (pip install "
                         f"'workerbridge[ui]'); wrote the HTML timeline {path} instead\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(tasks, title))
    return str(path)


def title_of(tasks: list[TaskRecord]) -> str:
    if not tasks:
        return "workerbridge task timeline: no tasks"
    span = max(t.end for t in tasks) - min(t.start for t in tasks)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(min(t.start for t in tasks)))
    return f"workerbridge task timeline: {len(tasks)} tasks, {span:.2f} s, from {when}"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# ---- layout shared by every renderer ----------------------------------------------------
def layout(tasks: list[TaskRecord], min_width: float) -> tuple[float, float, list]:
    """(t0, span, rows): rows[i] = [(phase, x0, x1)] in seconds from t0, each phase at
    least ``min_width`` wide (later phases of the task move right to make room)."""
    if not tasks:
        return 0.0, 1.0, []
    t0 = min(t.start for t in tasks)
    span = max(max(t.end for t in tasks) - t0, 1e-3)
    min_w = min_width * span
    rows = []
    for task in tasks:
        segs, cursor = [], None
        for name, a, b in task.phases():
            x0 = a - t0 if cursor is None else max(a - t0, cursor)
            x1 = max(b - t0, x0 + min_w)
            segs.append((name, x0, x1))
            cursor = x1
        rows.append(segs)
    span = max([span] + [s[2] for segs in rows for s in segs])
    return t0, span, rows


def _row_label(task: TaskRecord) -> str:
    bits = [task.label]
    if task.rows_in is not None:
        bits.append(f"{task.rows_in}→{task.rows_out if task.rows_out is not None else '?'} rows")
    if task.reused:
        bits.append("reused child")
    if task.failed:
        bits.append("FAILED")
    elif not task.completed:
        bits.append("incomplete")
    return "  ".join(bits)


def _ticks(span: float, n: int = 6) -> list[float]:
    raw = span / n
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(span / step) + 1)]


# ---- HTML: one inline SVG ------------------------------------------------------------------
def render_html(tasks: list[TaskRecord], title: Optional[str] = None) -> str:
    """A self-contained HTML page: an SVG with one ``<g class="task">`` per task."""
    title = title or title_of(tasks)
    label_w, plot_w, bar_h, gap, top = 330, 760, 18, 8, 60
    t0, span, rows = layout(tasks, 2 / plot_w)
    height = top + len(tasks) * (bar_h + gap) + 40
    width = label_w + plot_w + 30
    x = lambda s: label_w + s / span * plot_w  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">']
    # legend
    lx = label_w
    for name in PHASES:
        out.append(f'<rect x="{lx}" y="10" width="12" height="12" fill="{COLORS[name]}"/>'
                   f'<text x="{lx + 16}" y="20">{html.escape(PHASE_TITLES[name])}</text>')
        lx += 16 + 7 * len(PHASE_TITLES[name]) + 14
    axis_y = top + len(tasks) * (bar_h + gap)
    for tick in _ticks(span):
        out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top - 6}" y2="{axis_y}" '
                   f'stroke="#dddddd"/><text x="{x(tick):.1f}" y="{axis_y + 16}" '
                   f'text-anchor="middle">{tick:g} s</text>')
    for i, (task, segs) in enumerate(zip(tasks, rows)):
        y = top + i * (bar_h + gap)
        out.append(f'<g class="task" data-task="{html.escape(str(task.id))}" '
                   f'data-partition="{html.escape(str(task.partition))}">')
        out.append(f'<text x="{label_w - 8}" y="{y + bar_h - 5}" text-anchor="end">'
                   f'{html.escape(_row_label(task))}</text>')
        for name, a, b in segs:
            secs = next((bb - aa for n, aa, bb in task.phases() if n == name), 0.0)
            out.append(f'<rect class="{name}" x="{x(a):.2f}" y="{y}" width="{x(b) - x(a):.2f}" '
                       f'height="{bar_h}" fill="{COLORS[name]}"><title>{html.escape(task.label)}: '
                       f'{name} {secs:.3f} s</title></rect>')
        if task.failed or not task.completed:
            end = segs[-1][2] if segs else 0.0
            out.append(f'<rect class="failed" x="{x(end) + 2:.2f}" y="{y + 4}" width="{bar_h - 8}" '
                       f'height="{bar_h - 8}" fill="{FAILED_COLOR}"><title>'
                       f'{html.escape(task.error or "did not complete")}</title></rect>')
        out.append("</g>")
    out.append("</svg>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body style=\"margin:16px\">"
            f"<h3 style=\"font-family:sans-serif\">{html.escape(title)}</h3>\n"
            + "\n".join(out) + "\n</body></html>\n")


# ---- PNG with matplotlib ---------------------------------------------------------------------
def _png_matplotlib(tasks: list[TaskRecord], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = max(len(tasks), 1)
    fig = Figure(figsize=(11, 1.4 + 0.4 * n), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    t0, span, rows = layout(tasks, 3 / 700)
    for i, (task, segs) in enumerate(zip(tasks, rows)):
        for name, a, b in segs:
            ax.barh(i, b - a, left=a, height=0.6, color=COLORS[name], antialiased=False,
                    linewidth=0)
        if task.failed or not task.completed:
            end = segs[-1][2] if segs else 0.0
            ax.plot([end + span * 0.01], [i], marker="x", color=FAILED_COLOR, markersize=9)
    ax.set_yticks(range(len(tasks)), [_row_label(t) for t in tasks], fontsize=8)
    ax.set_ylim(len(tasks) - 0.4, -0.6)
    ax.set_xlim(0, span * 1.04)
    ax.set_xlabel("seconds since the first task started")
    ax.grid(axis="x", color="#dddddd")
    ax.set_axisbelow(True)
    ax.legend(handles=[Patch(color=COLORS[p], label=PHASE_TITLES[p]) for p in PHASES],
              loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.2)
