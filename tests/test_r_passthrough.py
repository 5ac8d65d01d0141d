"""A string column the R closure leaves unchanged goes back as it was read
(rscripts/arrow_ipc.R: keep, known), and every other column is encoded from
its R strings: generated partitions through a real Worker and R child, the
input itself as the oracle.  So does an int64 column, where the output schema
wants int64: exact, where R's doubles would have rounded it.

The closure returns, side by side, the column as read (twice), a copy with
one middle value changed, the column reversed, and a large_string column as
read.  A cache that matched columns by anything weaker than their values
(name, length, first or last value) would send the changed copy back
unchanged.  Null slots may hide bytes (Arrow allows it): they must stay null.  And the
pass-through must actually be taken for what pyarrow writes (padded buffers,
sliced batches): the codec is run on such a stream directly to check it.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wbtest import ROOT, RUNTIME
from workerbridge.driver.closure import R, pack
from workerbridge.driver.gateway import Gateway
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import COALESCE_ROWS, Worker

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CLOSURE = R("""function(d) {
  m <- d$s
  if (length(m)) {
    i <- (length(m) + 1L) %/% 2L
    m[i] <- if (is.na(m[i])) "was null" else paste0(m[i], "!")
  }
  data.frame(s = d$s, again = d$s, changed = m, rev = rev(d$s), ls = d$ls,
             stringsAsFactors = FALSE)
}""")

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)


def hiding_nulls(values: list, hidden: str, spare: bytes = b"") -> pa.Array:
    """A string array of values whose null slots hold the bytes of `hidden`,
    its data buffer ending in `spare` bytes past the last value."""
    data, offsets, valid = bytearray(), [0], []
    for v in values:
        data += (hidden if v is None else v).encode("utf-8")
        offsets.append(len(data))
        valid.append(v is not None)
    bitmap = pa.array(valid, pa.bool_()).buffers()[1]
    arr = pa.StringArray.from_buffers(len(values), pa.py_buffer(np.array(offsets, np.int32)),
                                      pa.py_buffer(bytes(data) + spare), bitmap, values.count(None))
    arr.validate(full=True)
    return arr


@st.composite
def partitions(draw):
    """1-4 batches of 0-60 rows: strings with nulls (their slots hiding bytes
    in some batches), and a large_string column."""
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        vals = draw(st.lists(st.none() | TEXT, max_size=60))
        hidden = draw(st.sampled_from(["", "hidden", "ü"]))
        longs = draw(st.lists(st.none() | TEXT, min_size=len(vals), max_size=len(vals)))
        batches.append(pa.record_batch({"s": hiding_nulls(vals, hidden),
                                        "ls": pa.array(longs, pa.large_string())}))
    return batches


def run(batches: list, options: dict) -> pa.Table:
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(CLOSURE, None, options), RUNTIME.digest, None, gw.address,
                        WorkerOptions())
        out = list(Worker(spec, 0, "passthrough", root=ROOT).run(iter(batches)))
    finally:
        gw.stop()
    for b in out:
        b.validate(full=True)
    return pa.Table.from_batches(out) if out else None


def expected(batches: list) -> dict:
    s = [v for b in batches for v in b.column(0).to_pylist()]
    changed = list(s)
    if s:
        i = (len(s) + 1) // 2 - 1
        changed[i] = "was null" if s[i] is None else s[i] + "!"
    return {"s": s, "again": s, "changed": changed, "rev": s[::-1],
            "ls": [v for b in batches for v in b.column(1).to_pylist()]}


@SETTINGS
@given(partitions(), st.sampled_from([{}, {"batch_rows": 7}]))
def test_unchanged_strings_go_back_as_read_and_changed_ones_as_changed(batches, options):
    got = run(batches, options)
    want = expected(batches)
    if not want["s"]:
        assert got is None or got.num_rows == 0
        return
    assert got.column_names == list(want)
    for name, values in want.items():
        assert got.column(name).to_pylist() == values, name


def test_a_partition_of_several_large_batches_and_a_slice():
    """Batches of COALESCE_ROWS rows and more reach the child one by one, so
    the column is read in pieces; one batch is a slice of a larger array, and
    two have spare bytes after their last string (as pyarrow's own padded
    buffers do): only each piece's strings may go back."""
    n = COALESCE_ROWS + 1
    rng = np.random.default_rng(5)
    batches = []
    for b in range(3):
        words = [None if k % 97 == 0 else f"{b}-{k}-{'é' * (k % 3)}"
                 for k in rng.integers(0, 10**9, n + 9)]
        s = hiding_nulls(words, "hidden", b"spare bytes" if b != 1 else b"")
        ls = pa.array(words[::-1], pa.large_string())
        whole = pa.record_batch({"s": s, "ls": ls})
        batches.append(whole.slice(4, n) if b == 1 else whole)
    got = run(batches, {})
    want = expected(batches)
    for name, values in want.items():
        assert got.column(name).to_pylist() == values, name


PASS_THROUGH_R = r"""
args <- commandArgs(trailingOnly = TRUE)
source(file.path(args[1L], "protocol.R"))
source(file.path(args[1L], "arrow_ipc.R"))
keep <- new.env(parent = emptyenv())
df <- arrow_read_stream(args[2L], keep = keep)
df$changed <- df$s
df$changed[2L] <- "changed"
prep <- arrow_prepare_frame(df, keep$cols)
con <- file(args[3L], "wb")
arrow_write_stream(prep, con)
close(con)
cat(vapply(prep$cols, function(col) !is.null(col$known), NA), sep = " ")
"""


def test_what_pyarrow_writes_is_passed_through(tmp_path):
    """The pass-through is taken for the streams pyarrow writes -- batches
    sliced from one array, buffers padded past their last string -- and not
    for a changed column; the bytes written back read as the input."""
    words = pa.array([f"s{i}" if i % 11 else None for i in range(5000)], pa.string())
    table = pa.table({"s": words, "ls": words.cast(pa.large_string())})
    batches = table.to_batches(max_chunksize=1000)
    batches.append(pa.record_batch({"s": hiding_nulls(["x", None, "ü"], "h", b"\0" * 61),
                                    "ls": pa.array(["x", None, "ü"], pa.large_string())}))
    src, dst = tmp_path / "in.arrows", tmp_path / "out.arrows"
    with pa.OSFile(str(src), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for b in batches:
            w.write_batch(b)
    script = tmp_path / "pass.R"
    script.write_text(PASS_THROUGH_R, encoding="utf-8")
    out = subprocess.run(["Rscript", "--vanilla", str(script), os.path.join(ROOT, "rscripts"),
                          str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TRUE", "TRUE", "FALSE"]
    with pa.OSFile(str(dst), "rb") as f:
        got = pa.ipc.open_stream(f).read_all()
    got.validate(full=True)
    s = pa.Table.from_batches(batches).column("s").to_pylist()
    assert got.column("s").to_pylist() == s
    assert got.column("ls").to_pylist() == s
    assert got.column("changed").to_pylist() == [s[0], "changed", *s[2:]]


INT64_CLOSURE = R("""function(d) {
  m <- d$k
  if (length(m)) m[1L] <- if (is.na(m[1L])) 7 else m[1L] + 1
  data.frame(a = d$a, again = d$a, k = d$k, changed = m, rev = rev(d$k), a_double = d$a)
}""")
INT64_OUT = pa.schema([("a", pa.int64()), ("again", pa.int64()), ("k", pa.int64()),
                       ("changed", pa.int64()), ("rev", pa.int64()), ("a_double", pa.float64())])
# past 2^53 (odd: a double cannot hold them), and int64's ends
EXTREMES = [2**53 + 1, -(2**53 + 1), 2**63 - 1, -2**63, 2**62 + 3]


@st.composite
def int64_partitions(draw):
    """1-4 batches of 0-40 rows: `a` over all of int64 (the first batch starts
    with EXTREMES), `k` within 2^53; both with nulls."""
    batches = []
    for b in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 40))
        a = draw(st.lists(st.none() | st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n))
        k = draw(st.lists(st.none() | st.integers(-2**53 + 2, 2**53 - 2), min_size=n, max_size=n))
        if b == 0:
            a, k = EXTREMES + a, [1, None, -5, 0, 2**52] + k
        batches.append(pa.record_batch({"a": pa.array(a, pa.int64()), "k": pa.array(k, pa.int64())}))
    return batches


@SETTINGS
@given(int64_partitions(), st.sampled_from([{}, {"batch_rows": 7}]))
def test_unchanged_int64_columns_go_back_exact_where_the_schema_wants_int64(batches, options):
    """`a` and `again` come back exactly as read (past 2^53 too); the changed
    and reordered `k` as R computed them; `a_double`, the same column under a
    float64 schema, as the doubles R holds (float(v), one rounding)."""
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(INT64_CLOSURE, None, options), RUNTIME.digest, INT64_OUT,
                        gw.address, WorkerOptions())
        got = pa.Table.from_batches(
            list(Worker(spec, 0, "int64", root=ROOT).run(iter(batches))), schema=INT64_OUT)
    finally:
        gw.stop()
    a = [v for b in batches for v in b.column("a").to_pylist()]
    k = [v for b in batches for v in b.column("k").to_pylist()]
    changed = [7 if k[0] is None else k[0] + 1] + k[1:]
    assert got.column("a").to_pylist() == a
    assert got.column("again").to_pylist() == a
    assert got.column("k").to_pylist() == k
    assert got.column("changed").to_pylist() == changed
    assert got.column("rev").to_pylist() == k[::-1]
    assert got.column("a_double").to_pylist() == [None if v is None else float(v) for v in a]
