"""The task timeline, drawn from a real spark_apply run: PNG (matplotlib) checked pixel by pixel,
without matplotlib an HTML page instead, HTML checked by its SVG groups."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib

import pandas as pd
import pytest

import workerbridge
from workerbridge import spark_apply
from workerbridge.driver.session import session_gateway as _gateway
from workerbridge.diagnostics.tasks import PHASES, tasks_from_events
from workerbridge.diagnostics.timeline import COLORS, write_timeline


@pytest.fixture(scope="module")
def run(spark):
    """A 3-partition spark_apply; (start time, its tasks)."""
    df = spark.createDataFrame(pd.DataFrame({"x": range(90)})).repartition(3)
    since = time.time()
    out = spark_apply(df, lambda d: d.assign(y=d.x * 2), schema="x long, y long")
    assert out.count() == 90
    tasks = [t for t in tasks_from_events(_gateway(spark).events())
             if t.start >= since and not t.on_driver]
    return since, tasks


def read_png(path) -> list:
    """Rows of (r, g, b) pixels of an 8-bit RGB/RGBA PNG (every filter type)."""
    try:
        from PIL import Image
        img = Image.open(path).convert("RGB")
        w, h = img.size
        data = img.tobytes()
        return [[tuple(data[(y * w + x) * 3:(y * w + x) * 3 + 3]) for x in range(w)]
                for y in range(h)]
    except ImportError:
        pass
    data = open(path, "rb").read()
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            bpp = {2: 3, 6: 4}[ctype]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            p = a + b - c
            pred = [0, a, b, (a + b) // 2,
                    a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c)
                    else b if abs(p - b) <= abs(p - c) else c][ftype]
            line[i] = (line[i] + pred) & 0xFF
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, bpp)])
        prev = line
    return rows


def bands(rows) -> list[set]:
    """Horizontal bands of pixel rows holding a phase color: for each band, its phases."""
    rgb = {tuple(bytes.fromhex(c[1:])): name for name, c in COLORS.items()}
    found, current = [], None
    for row in rows:
        names = {rgb[p] for p in row if p in rgb}
        if names and current is None:
            current = set()
            found.append(current)
        if names:
            current |= names
        else:
            current = None
    return found


def check_bars(path, n_tasks: int) -> None:
    found = bands(read_png(path))
    legend, bars = found[0], found[1:]
    assert legend == set(PHASES), found               # the legend shows every phase
    assert len(bars) == n_tasks, found                 # one bar per task
    assert set().union(*bars) == set(PHASES)           # every phase color is drawn
    assert all({"receive", "apply", "send"} <= b for b in bars), bars


def test_tasks_and_phases_from_real_lines(run):
    since, tasks = run
    assert sorted(t.partition for t in tasks) == ["0", "1", "2"]
    for t in tasks:
        assert t.completed and not t.failed and t.rows_in == t.rows_out == 30
        phases = t.phases()
        assert [p for p, _, _ in phases][-3:] == ["receive", "apply", "send"]
        assert all(a <= b for _, a, b in phases)
        assert phases[0][1] == t.times["start"] and phases[-1][2] == t.times["finished"]
    assert any(t.phases()[0][0] == "spawn" for t in tasks)   # at least one fresh child


def test_png_from_a_session(spark, run, tmp_path):
    since, tasks = run
    path = workerbridge.timeline(spark, str(tmp_path / "t.png"), since=since,
                                 include_driver=False)
    check_bars(path, 3)


def test_png_without_matplotlib_writes_html_and_says_so(tmp_path):
    """A real interpreter in which matplotlib cannot be imported."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from workerbridge.diagnostics.tasks import TaskRecord\n"
            "from workerbridge.diagnostics.timeline import write_timeline\n"
            "t = TaskRecord('7', partition='0', times={'start': 0.0, 'connected': 0.1,"
            " 'retrieved': 0.2, 'applied': 0.3, 'finished': 0.4, 'completed': 0.5})\n"
            "print(write_timeline([t], sys.argv[1]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.png")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    written = out.stdout.strip()
    assert written == str(tmp_path / "t.html") and not (tmp_path / "t.png").exists()
    assert open(written, encoding="utf-8").read().count('<g class="task"') == 1
    assert out.stderr.count("\n") == 1 and "matplotlib is not installed" in out.stderr


def test_html_has_one_group_per_task(spark, run, tmp_path):
    since, _ = run
    path = workerbridge.timeline(spark, str(tmp_path / "t.html"), since=since)
    text = open(path, encoding="utf-8").read()
    assert text.count('<g class="task"') == 3
    assert sorted(text.count(f'data-partition="{p}"') for p in "012") == [1, 1, 1]
    for phase in PHASES:
        assert f'<rect class="{phase}"' in text or phase == "spawn"
        assert phase in text                                # legend
    assert text.count('<rect class="apply"') == 3 and "partition 2 (task" in text


def test_a_failed_task_is_marked(spark, tmp_path):
    df = spark.createDataFrame(pd.DataFrame({"x": range(10)})).repartition(1)
    since = time.time()

    def boom(d):
        raise ValueError("no")

    with pytest.raises(Exception, match="ValueError"):
        spark_apply(df, boom, schema="x long").collect()
    path = workerbridge.timeline(spark, str(tmp_path / "f.html"), since=since)
    text = open(path, encoding="utf-8").read()
    assert text.count('<g class="task"') == 1
    assert '<rect class="failed"' in text
    assert "incomplete" in text or "FAILED" in text
    assert '<rect class="apply"' in text          # the phase it failed in, up to its last line
