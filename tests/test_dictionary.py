"""Repeated string columns travel dictionary-encoded between the Worker and
RScript (workerbridge/task/dictionary.py): the rule on generated columns, and real
partitions through a real Worker and R child, both ways, values unchanged."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wbtest import ROOT, RUNTIME
from workerbridge.driver.closure import R, pack
from workerbridge.driver.gateway import Gateway
from workerbridge.task import dictionary
from workerbridge.wire import protocol, repeats
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker

RNG = np.random.default_rng(11)


def keyed(n: int, k: int) -> pa.Array:
    words = np.array([f"key-{i}-é" for i in range(k)], dtype=object)
    return pa.array(words[RNG.integers(0, k, n)], pa.string())


@pytest.mark.parametrize("k", [1, 50, 1000, 20_000])
def test_estimate_from_the_sample(k):
    sample = keyed(repeats.SAMPLE_ROWS, k)
    distinct = len(sample.unique())
    est = repeats.estimated_distinct(distinct, len(sample))
    assert k / 2 <= est <= 2 * k, (k, distinct, est)


def test_the_rule_on_generated_columns():
    n = 100_000
    assert repeats.repeats_enough(keyed(n, 10))
    assert repeats.repeats_enough(keyed(n, 5_000))
    assert repeats.repeats_enough(keyed(n, 20_000))             # est. 20k <= n/2
    assert not repeats.repeats_enough(pa.array([f"s{i}" for i in range(n)]))
    nearly = pa.array([f"k{i}" for i in RNG.integers(0, 50 * n, n)])   # nearly all distinct
    assert not repeats.repeats_enough(nearly)
    assert not repeats.repeats_enough(pa.nulls(n, pa.string()))
    assert not repeats.repeats_enough(keyed(1, 1))
    batch = pa.record_batch({"k": keyed(n, 100), "u": pa.array([str(i) for i in range(n)]),
                             "x": pa.array(np.arange(n)), "lk": keyed(n, 7).cast(pa.large_string())})
    assert dictionary.repeated_string_columns(batch) == [0, 3]
    schema = dictionary.encoded_schema(batch.schema, [0, 3])
    enc = dictionary.encode_columns(batch, schema, [0, 3])
    assert enc.schema.field("lk").type == pa.dictionary(pa.int32(), pa.large_string())
    assert dictionary.decode_dictionaries(enc).equals(batch)


def run_r(code: str, batches: list, out_schema=None) -> pa.Table:
    gw = Gateway(log_path=None)
    try:
        spec = TaskSpec(pack(R(code)), RUNTIME.digest, out_schema, gw.address,
                        WorkerOptions())
        return pa.Table.from_batches(list(Worker(spec, 0, "dictionary", root=ROOT).run(iter(batches))))
    finally:
        gw.stop()


def partition_batches() -> tuple[pa.Table, list]:
    """Three input batches of 150k rows: a repeated column with nulls whose later
    batches bring new keys, a distinct column, a repeated large_string column."""
    batches = []
    for b in range(3):
        n = 150_000
        words = np.array([None, "", f"new-{b}", "中文", "ké"] + [f"w{i}" for i in range(200)],
                         dtype=object)
        batches.append(pa.record_batch({
            "k": pa.array(words[RNG.integers(0, len(words), n)], pa.string()),
            "u": pa.array([f"u{b}-{i}" for i in range(n)], pa.string()),
            "lk": pa.array(words[RNG.integers(1, 9, n)], pa.large_string()),
            "i": pa.array(np.arange(n, dtype=np.int32))}))
    return pa.Table.from_batches(batches), batches


def test_r_identity_over_repeated_strings_is_exact():
    table, batches = partition_batches()
    assert dictionary.repeated_string_columns(batches[0]) == [0, 2]
    out = run_r("function(d) d", batches, out_schema=table.schema)
    assert out.schema == table.schema
    assert out.equals(table)


def test_r_factors_and_repeated_results_come_back_plain():
    table, batches = partition_batches()
    code = ("function(d) data.frame(f = factor(d$k, levels = c('ké', '中文', 'unused')), "
            "r = rep(c('a', 'b', NA), length.out = nrow(d)), stringsAsFactors = FALSE)")
    # schema inferred (no output schema: the driver's inference path) and given
    for schema in (None, pa.schema([("f", pa.string()), ("r", pa.string())])):
        out = run_r(code, batches, out_schema=schema)
        assert out.schema.types == [pa.string(), pa.string()]
        k = table.column("k").to_pylist()
        assert out.column("f").to_pylist() == [v if v in ("ké", "中文") else None for v in k]
        assert out.column("r").to_pylist() == (["a", "b", None] * 150_000)[:table.num_rows]


ASCII_TEXT = st.text(st.characters(max_codepoint=0x7F, blacklist_characters="\x00"), max_size=6)
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=6)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.none() | ASCII_TEXT | ANY_TEXT, max_size=30), st.booleans(),
       st.integers(0, 30), st.integers(0, 30))
def test_ascii_columns_names_exactly_the_all_ascii_string_columns(values, large, a, b):
    """The flag R trusts (skipping its UTF-8 check) is set exactly when every
    value of the batch's slice is ASCII: slices, nulls, large_string, and an
    int column that is never named; the bytes of rows outside the slice do
    not count."""
    arr = pa.array(values, pa.large_string() if large else pa.string())
    batch = pa.record_batch({"n": pa.array(range(len(values))), "s": arr})
    lo, hi = min(a, b, len(values)), min(max(a, b), len(values))
    part = batch.slice(lo, hi - lo)
    ascii = all(v.isascii() for v in values[lo:hi] if v is not None)
    want = {protocol.ASCII_COLUMNS_KEY: "1"} if ascii else {}
    assert dictionary.ascii_columns(part) == want


ASCII_FLAG_R = r"""
args <- commandArgs(trailingOnly = TRUE)
invisible(Sys.setlocale("LC_CTYPE", "C.UTF-8"))       # as the child makes sure
source(args[1L])
df <- arrow_read_stream(args[2L])
cat(Encoding(df$s), "\n")
"""


@pytest.mark.parametrize("flagged", [False, True])
def test_the_r_reader_trusts_the_ascii_flag(tmp_path, flagged):
    """The reader acts on the flag (here a false one, to make it visible): a
    non-ASCII string is marked UTF-8 after R's own check, and left as it is
    when the batch says its column is all ASCII."""
    batch = pa.record_batch({"s": pa.array(["é"])})
    path = tmp_path / "in.arrows"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, batch.schema) as w:
        w.write_batch(batch, custom_metadata={protocol.ASCII_COLUMNS_KEY: "0"} if flagged else None)
    r = subprocess.run(["Rscript", "--vanilla", "-e", ASCII_FLAG_R,
                        os.path.join(ROOT, "rscripts", "arrow_ipc.R"), str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == (["unknown"] if flagged else ["UTF-8"])


def test_the_key_is_the_r_readers():
    with open(os.path.join(ROOT, "rscripts", "arrow_ipc.R"), encoding="utf-8") as f:
        assert f'.ai_ascii_key <- "{protocol.ASCII_COLUMNS_KEY}"' in f.read()
