"""A column the R closure returns as it read it goes back named, not written:
RScript writes it as a Null column and names its input column in OUTPUT
(rscripts/arrow_ipc.R: keep, known), and the Worker puts back the column it
sent (workerbridge/task/passthrough.py).  Every other column is encoded from
R's values.  Generated partitions through a real Worker and R child, the input
itself as the oracle:

- strings: the column as read (twice), a copy with one middle value changed,
  the column reversed, and a large_string column as read.  A match weaker than
  the values (name, length, first or last value) would send the changed copy
  back unchanged.  Null slots may hide bytes (Arrow allows it): they stay null.
- int64: exact where the output schema wants int64 (past 2^53 too), R's
  doubles where it wants float64.
- every kind R names (float64, int32, bool, date32, strings read as factors or
  dictionary-encoded, int64 read as strings), next to copies R changed only in
  ways identical() with its defaults would miss (-0 made +0), which must go
  back as R made them.
- the Worker itself refuses a wrong naming (a column not of type Null, an
  input position or rows that were not sent).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from wbtest import ROOT, RUNTIME
from workerbridge.driver.closure import R, pack
from workerbridge.driver.gateway import Gateway
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task import passthrough
from workerbridge.task.worker import COALESCE_ROWS, Worker
from workerbridge.wire.protocol import ProtocolError

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
arrow_write_stream(prep, con, batch_rows = 1700L)
close(con)
cat(wb_json_encode(list(input_columns = prep$refs)))
"""


def test_what_pyarrow_writes_is_named_and_put_back(tmp_path):
    """For the streams pyarrow writes (batches sliced from one array, buffers
    padded past their last string), R names the unchanged columns, writes them
    as Null columns holding nothing, and writes the changed one; the Worker's
    splice puts the sent columns back, across R's own output batches."""
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
    refs = passthrough.input_columns(json.loads(out.stdout))
    assert refs == {0: 0, 1: 1}
    with pa.OSFile(str(dst), "rb") as f:
        written = list(pa.ipc.open_stream(f))
    assert len(written) == 3                      # 5003 rows in batches of 1700
    assert [f.type for f in written[0].schema] == [pa.null(), pa.null(), pa.string()]
    sent = passthrough.SentColumns()
    for b in batches:
        sent.add(b)
    pieces, start = [], 0
    for b in written:
        pieces += passthrough.splice(b, refs, sent, start)
        start += b.num_rows
    got = pa.Table.from_batches(pieces)
    got.validate(full=True)
    s = pa.Table.from_batches(batches).column("s").to_pylist()
    assert got.column("s").to_pylist() == s
    assert got.column("ls").to_pylist() == s
    assert got.column("changed").to_pylist() == [s[0], "changed", *s[2:]]


def test_the_worker_refuses_a_wrong_naming():
    """What RScript names is checked: the named column must be of type Null,
    and its input position and rows must be ones the Worker sent."""
    sent = passthrough.SentColumns()
    sent.add(pa.record_batch({"a": pa.array([1, 2, 3])}))
    nulls = pa.record_batch({"a": pa.nulls(3)})
    with pytest.raises(ProtocolError, match="cannot be input column"):
        passthrough.splice(pa.record_batch({"a": pa.array([1, 2, 3])}), {0: 0}, sent, 0)
    with pytest.raises(ProtocolError, match="cannot be input column"):
        passthrough.splice(nulls, {0: 1}, sent, 0)
    with pytest.raises(ProtocolError, match="rows 1..3"):
        passthrough.splice(nulls, {0: 0}, sent, 1)
    with pytest.raises(ProtocolError, match="output columns"):
        passthrough.splice(nulls, {1: 0}, sent, 0)
    with pytest.raises(ProtocolError, match="not by positions"):
        passthrough.input_columns({"input_columns": {"a": "b"}})
    with pytest.raises(ProtocolError, match="no input was sent"):
        passthrough.splice(nulls, {0: 0}, passthrough.SentColumns(), 0)
    assert passthrough.splice(nulls, {0: 0}, sent, 0)[0].column(0).to_pylist() == [1, 2, 3]


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


KINDS_CLOSURE = R("""function(d) {
  d$f0 <- d$f + 0          # -0 made +0: equal to f by ==, not bit for bit
  d$copy <- d$s            # a second name for a column as read
  d
}""")
KINDS_OUT = pa.schema([("f", pa.float64()), ("i", pa.int32()), ("b", pa.bool_()),
                       ("dt", pa.date32()), ("k", pa.int64()), ("s", pa.string()),
                       ("f0", pa.float64()), ("copy", pa.string())])
NAMED = 7                               # all but f0 (when f holds a -0)
FLOATS = st.none() | st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, float("nan")])


@st.composite
def kinds_partitions(draw):
    """1-3 batches of 1-30 rows of every kind R names; `i` may hold int32's
    minimum, which R reads as NA, `s` repeats (the Worker sends it
    dictionary-encoded), `k` passes 2^53."""
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 30))
        col = lambda s: draw(st.lists(s, min_size=n, max_size=n))  # noqa: E731
        batches.append(pa.record_batch({
            "f": pa.array(col(FLOATS), pa.float64()),
            "i": pa.array(col(st.none() | st.sampled_from([-2**31, -1, 0, 2**31 - 1])), pa.int32()),
            "b": pa.array(col(st.none() | st.booleans()), pa.bool_()),
            "dt": pa.array(col(st.none() | st.dates(datetime.date(1, 1, 1))), pa.date32()),
            "k": pa.array(col(st.none() | st.integers(-2**63, 2**63 - 1)), pa.int64()),
            "s": pa.array(col(st.none() | st.sampled_from(["a", "b", "é"])), pa.string())}))
    return batches


def same_bits(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Equal values and nulls, doubles bit for bit (NaN equals NaN, -0 is not 0)."""
    a, b = a.combine_chunks(), b.combine_chunks()
    if not pa.types.is_float64(a.type):
        return a.equals(b)
    if a.type != b.type or a.is_null().to_pylist() != b.is_null().to_pylist():
        return False
    valid = ~np.asarray(a.is_null())
    return np.array_equal(a.to_numpy(zero_copy_only=False).view(np.uint64)[valid],
                          b.to_numpy(zero_copy_only=False).view(np.uint64)[valid])


@SETTINGS
@given(kinds_partitions(), st.sampled_from([{}, {"factors": True}, {"int64": "character"},
                                            {"batch_rows": 7}]))
def test_every_kind_r_names_goes_back_as_sent(batches, options):
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(KINDS_CLOSURE, None, options), RUNTIME.digest, KINDS_OUT,
                        gw.address, WorkerOptions())
        worker = Worker(spec, 0, "kinds", root=ROOT)
        got = pa.Table.from_batches(list(worker.run(iter(batches))), schema=KINDS_OUT)
    finally:
        gw.stop()
    got.validate(full=True)
    sent = pa.Table.from_batches(batches)
    f = sent.column("f").to_numpy(zero_copy_only=False)
    i = sent.column("i").to_pylist()
    # f0 is f bit for bit (so named too) unless f holds a -0; an `i` holding
    # int32's minimum (R's NA) is written by R, the minimum made null
    int_min = -2**31 in i
    assert worker.stats["input_columns"] == NAMED + (not np.signbit(f[f == 0]).any()) - int_min
    assert got.column("i").to_pylist() == [None if v == -2**31 else v for v in i]
    for name in sent.column_names:
        if name != "i":
            assert same_bits(got.column(name), sent.column(name)), name
    assert got.column("copy").to_pylist() == sent.column("s").to_pylist()
    f0 = got.column("f0").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(f0), np.isnan(f))     # nulls and NaN alike
    ok = ~np.isnan(f)
    assert np.array_equal(f0[ok], f[ok]) and not np.signbit(f0[ok & (f == 0)]).any()


def test_a_double_with_the_bits_of_rs_na_is_written_as_r_holds_it():
    """A valid double with the bits of R's NA reads as NA, and R cannot tell
    it from a null (nor a column computed from it): that column is written,
    not named, and the value comes back null, as R holds it."""
    na_bits = np.array([0x7FF00000000007A2], np.uint64).view(np.float64)
    f = pa.array(np.concatenate([na_bits, [1.5, np.nan]]), pa.float64())
    batch = pa.record_batch({"f": f, "g": pa.array([1.0, 2.0, 3.0])})
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(R("function(d) d"), None, {}), RUNTIME.digest, None, gw.address,
                        WorkerOptions())
        worker = Worker(spec, 0, "na-bits", root=ROOT)
        got = pa.Table.from_batches(list(worker.run(iter([batch]))))
    finally:
        gw.stop()
    assert worker.stats["input_columns"] == 1                 # g only
    values = got.column("f").to_pylist()
    assert values[:2] == [None, 1.5] and np.isnan(values[2])
    assert got.column("g").to_pylist() == [1.0, 2.0, 3.0]
