"""The base-R Arrow IPC codec (rscripts/arrow_ipc.R) against pyarrow, and the
R child (rscripts/child.R) against a real socket server speaking the protocol.

Real Rscript, real pyarrow, no mocks.  To keep the suite fast, one R process
handles many files: the tests write streams and a JSON manifest, one driver
run (rscripts/arrow_ipc.R sourced) reads/writes them all, and the assertions
run on its outputs.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hmac
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from workerbridge.wire import protocol
from workerbridge.task import passthrough
from workerbridge.task.dictionary import repeats_enough

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RDIR = os.path.join(ROOT, "rscripts")
CHILD_R = os.path.join(RDIR, "child.R")
RSCRIPT = shutil.which("Rscript") or "/usr/bin/Rscript"

pytestmark = pytest.mark.skipif(not os.path.exists(RSCRIPT), reason="Rscript not installed")

# ---------------------------------------------------------------------------
# The R driver: runs the jobs of a JSON manifest in one R process.

DRIVER_R = r'''
invisible(compiler::enableJIT(0L))    # compiling the codec costs more than it saves here
args <- commandArgs(trailingOnly = TRUE)
rdir <- args[1L]
source(file.path(rdir, "protocol.R"))
source(file.path(rdir, "arrow_ipc.R"))

put_json <- function(x, path) {
  con <- file(path, "wb"); writeBin(charToRaw(wb_json_encode(x)), con); close(con)
}
hexraw <- function(r) if (is.null(r)) NULL else paste(as.character(r), collapse = "")
fmt_col <- function(x) {
  if (is.factor(x)) return(list(levels = I(levels(x)), codes = I(as.integer(x))))
  if (inherits(x, "Date")) return(I(ifelse(is.na(x), NA_character_, format(x, "%Y-%m-%d"))))
  if (inherits(x, "POSIXct")) {
    tz <- attr(x, "tzone")
    return(list(tzone = tz,
                us = I(ifelse(is.na(x), NA_character_, sprintf("%.0f", round(unclass(x) * 1e6)))),
                secs = I(ifelse(is.na(x), NA_character_, sprintf("%.9f", unclass(x)))),
                wall = I(ifelse(is.na(x), NA_character_, format(x, "%Y-%m-%d %H:%M:%S", tz = tz)))))
  }
  if (is.list(x)) return(I(lapply(x, hexraw)))
  if (is.double(x))
    return(I(ifelse(is.nan(x), "NaN", ifelse(is.na(x), "NA", sprintf("%.17g", x)))))
  if (is.character(x))
    return(list(values = I(x), enc = I(Encoding(x)), bytes = I(nchar(x, type = "bytes"))))
  I(x)
}
info_of <- function(df, warnings) {
  list(nrow = nrow(df), ncol = length(df), names = I(names(df)),
       classes = I(vapply(df, function(x) class(x)[1L], "")),
       types = I(vapply(df, typeof, "")),
       warnings = I(as.character(warnings)))
}

r_frames <- function() {
  n <- 7L
  types <- data.frame(
    i = c(1L, NA, -3L, 2147483647L, -2147483647L, 0L, 42L),
    d = c(1.5, NaN, NA, Inf, -Inf, -0.25, 1e300),
    s = c("a", "", NA, "h\u00e9llo", "\u4e2d\u6587\U0001F600", "tab\there", "z"),
    b = c(TRUE, FALSE, NA, TRUE, TRUE, FALSE, NA),
    stringsAsFactors = FALSE)
  types$f <- factor(c("lo", "hi", NA, "hi", "\u00fc", "lo", "lo"), levels = c("lo", "hi", "\u00fc"))
  types$dt <- as.Date(c("1969-12-31", "1900-01-01", NA, "2024-02-29", "1970-01-01", "2262-04-11", "1583-01-01"))
  types$ts <- structure(c(-1.5, 0, NA, 1700000000.123456, 1e9 + 0.000001, -2208988800, 4102444800.5),
                        class = c("POSIXct", "POSIXt"), tzone = "Asia/Tokyo")
  types$ts_notz <- structure(c(1, 2.25, NA, 3, 4, 5, 6), class = c("POSIXct", "POSIXt"))
  types$bin <- list(as.raw(c(0, 1, 255)), NULL, raw(0), charToRaw("abc"), as.raw(0), NULL, as.raw(7))
  types$asis <- I(c(1L, 2L, 3L, 4L, 5L, 6L, 7L))
  big <- data.frame(i = seq_len(150000L), d = seq_len(150000L) * 0.5,
                    s = paste0("s", seq_len(150000L)), stringsAsFactors = FALSE)
  big$s[seq(1, 150000, by = 1000)] <- NA
  dup <- structure(list(1:2, c("x", "y"), c(TRUE, NA)), names = c("a", "a", "not syntactic \u00e9"),
                   class = "data.frame", row.names = .set_row_names(2L))
  split <- data.frame(i = 1:10, s = sprintf("%040d", 1:10), stringsAsFactors = FALSE)
  split$bin <- lapply(1:10, function(k) as.raw(rep(k, 30)))
  split$s[4] <- NA
  # repeated strings and factors (dictionaries), next to distinct strings;
  # rep_b: other factor levels, the repeated and the distinct column swapped
  set.seed(7)
  keys <- c("k\u00e9", "", "b", "tab\there", "\U0001F600")
  rep_a <- data.frame(rs = sample(keys, 20000, TRUE), us = sprintf("u%06d", 1:20000),
                      f = factor(sample(c("x", "y"), 20000, TRUE), levels = c("y", "x", "unused")),
                      allna = NA_character_, stringsAsFactors = FALSE)
  rep_a$rs[c(1, 500, 19999)] <- NA
  rep_a$f[2] <- NA
  rep_b <- data.frame(rs = sprintf("v%d", 1:3000), us = rep(c("p", "q"), 1500),
                      f = factor(rep(c("new", NA), 1500)), allna = rep(c("z", NA), 1500),
                      stringsAsFactors = FALSE)
  list(types = types, types0 = types[0, ], nocols = data.frame(row.names = 1:7),
       rep_a = rep_a, rep_b = rep_b,
       empty = data.frame(), big = big, dup = dup, split = split,
       toolong = data.frame(s = strrep("x", 150), stringsAsFactors = FALSE))
}

jobs <- wb_json_decode(paste(readLines(args[2L], encoding = "UTF-8"), collapse = "\n"),
                       simplify = FALSE)
frames <- NULL
for (job in jobs) {
  mode <- job$mode
  if (mode == "strict") {                    # errors propagate: non-zero exit
    arrow_read_stream(job[["in"]])
    next
  }
  res <- tryCatch({
    warns <- character(0)
    if (mode %in% c("roundtrip", "values", "error")) {
      src <- if (isTRUE(job$raw)) readBin(job[["in"]], "raw", file.size(job[["in"]])) else job[["in"]]
      df <- withCallingHandlers(
        arrow_read_stream(src, int64 = if (is.null(job$int64)) "double" else job$int64,
                          factors = isTRUE(job$factors)),
        warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") })
      info <- info_of(df, warns)
      if (mode == "values") info$values <- lapply(df, fmt_col)
      if (mode == "roundtrip") arrow_write_stream(df, file(job$out, "wb"))
      if (isTRUE(job$as_int64)) {              # written back as int64, as the child does
        for (j in seq_along(df)) class(df[[j]]) <- "wb_int64"
        arrow_write_stream(df, file(job$out64, "wb"))
      }
      info
    } else if (mode == "rwrite") {
      if (is.null(frames)) frames <- r_frames()
      df <- frames[[job$frame]]
      write_it <- function() {
        con <- file(job$out, "wb")
        on.exit(close(con))
        arrow_write_stream(df, con, batch_rows = 65536L)
      }
      if (!is.null(job$max_offset)) {          # a lower 32-bit offset limit: batches split
        saved <- .ai_max_offset
        assign(".ai_max_offset", job$max_offset, envir = globalenv())
        tryCatch(write_it(), finally = assign(".ai_max_offset", saved, envir = globalenv()))
      } else {
        write_it()
      }
      back <- arrow_read_stream(job$out)
      info <- info_of(df, character(0))
      info$self_identical <- identical(back, df)
      info
    } else if (mode == "rstream") {           # several frames through one stream writer
      if (is.null(frames)) frames <- r_frames()
      con <- file(job$out, "wb")
      w <- arrow_stream_writer(con)
      for (nm in unlist(job$frames)) w$write(frames[[nm]])
      w$close()
      close(con)
      list(ok = TRUE)
    } else if (mode == "badwrite") {
      df <- switch(job$what,
                   complex = data.frame(ok = 1:2, cplx = c(1i, 2i)),
                   difftime = data.frame(dt = as.difftime(c(1, 2), units = "secs")),
                   listcol = { d <- data.frame(a = 1:2); d$l <- list(1, "x"); d })
      arrow_write_stream(df)
      list(ok = TRUE)
    } else stop("unknown mode ", mode)
  }, error = function(e) list(error = conditionMessage(e), error_class = I(class(e)),
                              column = if (is.null(e$column)) NULL else e$column))
  put_json(res, job$info)
}
'''


def write_stream(path, table_or_batches, schema=None, options=None):
    batches = table_or_batches
    if isinstance(table_or_batches, pa.Table):
        schema = table_or_batches.schema
        batches = table_or_batches.to_batches()
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema, options=options) as w:
        for b in batches:
            w.write_batch(b)


def read_stream(path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as f:
        return pa.ipc.open_stream(f).read_all()


def run_driver(tmp_path, jobs, timeout=120, check=True):
    drv = tmp_path / "driver.R"
    drv.write_text(DRIVER_R, encoding="utf-8")
    man = tmp_path / f"manifest-{secrets.token_hex(4)}.json"
    man.write_text(json.dumps(jobs, ensure_ascii=False), encoding="utf-8")
    res = subprocess.run([RSCRIPT, "--vanilla", str(drv), RDIR, str(man)],
                         capture_output=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stderr.decode()
    return res


def load_info(job):
    with open(job["info"], encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# Test data

RNG = np.random.default_rng(20240229)
WORDS = ["", "a", "héllo", "中文", "😀 emoji", "tab\tnewline\n", "quote\"back\\", "ü" * 20, "plain text"]


def mask(n, p=0.2):
    return RNG.random(n) < p


def all_types_table(n: int) -> pa.Table:
    cols = {}
    cols["null"] = pa.nulls(n)
    cols["bool"] = pa.array(RNG.random(n) < 0.5, mask=mask(n))
    cols["int8"] = pa.array(RNG.integers(-128, 128, n), pa.int8(), mask=mask(n))
    cols["int16"] = pa.array(RNG.integers(-2**15, 2**15, n), pa.int16(), mask=mask(n))
    cols["int32"] = pa.array(RNG.integers(-2**31 + 1, 2**31, n), pa.int32(), mask=mask(n))
    cols["uint8"] = pa.array(RNG.integers(0, 256, n), pa.uint8(), mask=mask(n))
    cols["uint16"] = pa.array(RNG.integers(0, 2**16, n), pa.uint16(), mask=mask(n))
    cols["uint32"] = pa.array(RNG.integers(0, 2**32, n, dtype=np.uint64), pa.uint32(), mask=mask(n))
    cols["int64"] = pa.array(RNG.integers(-2**53, 2**53 + 1, n), pa.int64(), mask=mask(n))
    cols["uint64"] = pa.array(RNG.integers(0, 2**53 + 1, n, dtype=np.uint64), pa.uint64(), mask=mask(n))
    f64 = RNG.standard_normal(n) * 10.0 ** RNG.integers(-300, 300, n)
    special = RNG.integers(0, 8, n)
    f64 = np.where(special == 0, np.nan, f64)
    f64 = np.where(special == 1, np.inf, f64)
    f64 = np.where(special == 2, -np.inf, f64)
    f64 = np.where(special == 3, -0.0, f64)
    cols["float64"] = pa.array(f64, mask=mask(n))
    f32 = RNG.standard_normal(n) * 10.0 ** RNG.integers(-30, 30, n)
    f32 = np.where(special == 0, np.nan, np.where(special == 1, np.inf, np.where(special == 2, -np.inf, f32)))
    cols["float32"] = pa.array(f32.astype(np.float32), pa.float32(), mask=mask(n))
    words = [WORDS[i] for i in RNG.integers(0, len(WORDS), n)]
    words = [w + str(i) if i % 3 == 0 else w for i, w in enumerate(words)]
    cols["utf8"] = pa.array(words, pa.string(), mask=mask(n))
    cols["large_utf8"] = pa.array(words, pa.large_string(), mask=mask(n))
    blobs = [RNG.bytes(int(k)) for k in RNG.integers(0, 12, n)]
    cols["binary"] = pa.array(blobs, pa.binary(), mask=mask(n))
    cols["large_binary"] = pa.array(blobs, pa.large_binary(), mask=mask(n))
    days = RNG.integers(-200_000, 200_000, n)
    cols["date32"] = pa.array(days, pa.int32(), mask=mask(n)).cast(pa.date32())
    cols["date64"] = pa.array(days * 86_400_000, pa.int64(), mask=mask(n)).cast(pa.date64())
    secs = RNG.integers(-2_208_988_800, 4_102_444_800, n)            # 1900 .. 2100
    us = secs * 1_000_000 + RNG.integers(0, 1_000_000, n)
    for unit, vals in (("s", secs), ("ms", secs * 1000 + RNG.integers(0, 1000, n)), ("us", us),
                       ("ns", us * 1000)):
        for tz in (None, "UTC", "America/New_York", "+07:30"):
            name = f"ts_{unit}_{(tz or 'naive').replace('/', '_')}"
            cols[name] = pa.array(vals, pa.int64(), mask=mask(n)).cast(pa.timestamp(unit, tz))
    dec = [decimal.Decimal(int(v)).scaleb(-3) for v in RNG.integers(-10**12, 10**12, n)]
    cols["decimal128"] = pa.array(dec, pa.decimal128(15, 3), mask=mask(n))
    dwords = pa.array([WORDS[i] for i in RNG.integers(0, len(WORDS), n)], pa.string(), mask=mask(n))
    cols["dict_utf8"] = dwords.dictionary_encode()
    cols["dict8_utf8"] = pc.cast(dwords, pa.dictionary(pa.int8(), pa.string()))
    return pa.table(cols)


def expected_roundtrip(table: pa.Table, int64: str = "double") -> dict[str, pa.Array]:
    """What R writes back after reading `table` (per column)."""
    out = {}
    for name, col in zip(table.column_names, table.columns):
        col = col.combine_chunks()
        t = col.type
        if pa.types.is_null(t):
            exp = pa.nulls(len(col), pa.bool_())
        elif pa.types.is_dictionary(t):
            exp = col.dictionary_decode().cast(pa.string())
        elif pa.types.is_int64(t) or pa.types.is_uint64(t):
            if int64 == "character":
                exp = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
            else:
                exp = pa.array([None if v is None else float(v) for v in col.to_pylist()], pa.float64())
        elif pa.types.is_uint32(t):
            exp = col.cast(pa.float64())
        elif pa.types.is_integer(t):
            exp = col.cast(pa.int32())
        elif pa.types.is_floating(t):
            exp = col.cast(pa.float64())
        elif pa.types.is_large_string(t):
            exp = col.cast(pa.string())
        elif pa.types.is_large_binary(t):
            exp = col.cast(pa.binary())
        elif pa.types.is_date(t):
            exp = col.cast(pa.date32())
        elif pa.types.is_timestamp(t):
            exp = col.cast(pa.timestamp("us", t.tz)).view(pa.timestamp("us", t.tz or "UTC"))
        elif pa.types.is_decimal(t):
            exp = pa.array([None if v is None else float(v) for v in col.to_pylist()], pa.float64())
        else:
            exp = col
        out[name] = exp
    return out


def assert_same_array(got: pa.Array, exp: pa.Array, name: str):
    if pa.types.is_string(exp.type):
        # R writes a string column dictionary-encoded exactly when it repeats
        # by the rule the Worker uses (pyarrow's distinct count as the oracle)
        want_dict = repeats_enough(exp)
        assert pa.types.is_dictionary(got.type) == want_dict, f"{name}: {got.type}, rule {want_dict}"
        if want_dict:
            assert got.type == pa.dictionary(pa.int32(), pa.string()), f"{name}: {got.type}"
            assert got.dictionary.null_count == 0
            assert len(got.dictionary) == len(pc.unique(got.dictionary)), f"{name}: repeated entries"
            got = got.dictionary_decode()
    assert got.type == exp.type, f"{name}: type {got.type} != {exp.type}"
    assert len(got) == len(exp), f"{name}: length"
    assert got.is_null().equals(exp.is_null()), f"{name}: null mask differs"
    if pa.types.is_floating(exp.type):
        gn = pc.is_nan(got).fill_null(False)
        en = pc.is_nan(exp).fill_null(False)
        assert gn.equals(en), f"{name}: NaN mask differs"
        got = pc.if_else(gn, 0.0, got)
        exp = pc.if_else(en, 0.0, exp)
        # -0.0 == 0.0 in equals; also check sign bits
        gs = pc.is_finite(got)
        assert gs.equals(pc.is_finite(exp)), f"{name}: finiteness differs"
        g = got.to_numpy(zero_copy_only=False)
        e = exp.to_numpy(zero_copy_only=False)
        ok = ~np.isnan(e)
        assert np.array_equal(np.signbit(g[ok]), np.signbit(e[ok])), f"{name}: sign bits differ"
    if not got.equals(exp):
        g, e = got.to_pylist(), exp.to_pylist()
        bad = [i for i in range(len(g)) if g[i] != e[i]][:5]
        raise AssertionError(f"{name}: values differ at {bad}: {[g[i] for i in bad]} != {[e[i] for i in bad]}")


R_CLASS = {
    "null": "logical", "bool": "logical", "int8": "integer", "int16": "integer", "int32": "integer",
    "uint8": "integer", "uint16": "integer", "uint32": "numeric", "int64": "numeric",
    "uint64": "numeric", "float32": "numeric", "float64": "numeric", "utf8": "character",
    "large_utf8": "character", "binary": "list", "large_binary": "list", "date32": "Date",
    "date64": "Date", "decimal128": "numeric", "dict_utf8": "character", "dict8_utf8": "character",
}


# ---------------------------------------------------------------------------
# pyarrow -> R -> pyarrow, every type, sizes 0, 1, 100000, in one R process

def test_roundtrip_all_types(tmp_path):
    jobs, cases = [], []
    for n in (0, 1, 100_000):
        table = all_types_table(n)
        for int64, raw in (("double", False), ("character", True)):
            if True:
                tag = f"{n}-{int64}-{raw}"
                src = tmp_path / f"in-{tag}.arrow"
                write_stream(src, table)
                job = {"mode": "roundtrip", "in": str(src), "out": str(tmp_path / f"out-{tag}.arrow"),
                       "info": str(tmp_path / f"info-{tag}.json"), "int64": int64, "raw": raw}
                jobs.append(job)
                cases.append((job, table, int64, n))
        # the same rows in several batches of different sizes
        if n:
            part = table.slice(0, min(n, 20_000))
            src = tmp_path / f"in-{n}-multi.arrow"
            write_stream(src, part.to_batches(max_chunksize=max(1, part.num_rows // 3)), table.schema)
            job = {"mode": "roundtrip", "in": str(src), "out": str(tmp_path / f"out-{n}-multi.arrow"),
                   "info": str(tmp_path / f"info-{n}-multi.json")}
            jobs.append(job)
            cases.append((job, part, "double", part.num_rows))
    t0 = time.time()
    run_driver(tmp_path, jobs)
    elapsed = time.time() - t0
    print(f"R driver: {elapsed:.2f}s for {len(jobs)} streams")
    for job, table, int64, n in cases:
        info = load_info(job)
        assert "error" not in info, info
        assert info["nrow"] == n and info["ncol"] == table.num_columns
        assert info["names"] == table.column_names
        classes = dict(zip(info["names"], info["classes"]))
        for name, cls in R_CLASS.items():
            want = "character" if (int64 == "character" and name in ("int64", "uint64")) else cls
            assert classes[name] == want, (name, classes[name])
        for name in table.column_names:
            if name.startswith("ts_"):
                assert classes[name] == "POSIXct"
        assert info["warnings"] == []
        got = read_stream(job["out"])
        assert got.num_rows == n
        exp = expected_roundtrip(table, int64)
        assert got.column_names == list(exp)
        for name in got.column_names:
            assert_same_array(got.column(name).combine_chunks(), exp[name], f"{name} (n={n}, {int64})")
    assert elapsed < 60, f"R driver took {elapsed:.1f}s"


def test_buffers_past_64_mib_and_negative_int64_round_trip(tmp_path):
    # value buffers over 64 MiB are read as raw first, then converted (the
    # reader's guard against a corrupt length); negative int64 take the
    # general (two halves) path; the oracle is the table written
    n = 8_500_000                                  # 68 MB a column
    rng = np.random.default_rng(3)
    ints = rng.integers(-2**52, 2**52, n)
    table = pa.table({"f": pa.array(rng.standard_normal(n)), "i": pa.array(ints, pa.int64())})
    src, out = tmp_path / "big.arrow", tmp_path / "big-out.arrow"
    write_stream(src, table)
    for b in pa.ipc.open_stream(pa.OSFile(str(src), "rb")):
        assert b.column("f").buffers()[1].size > 64 * 2**20
    job = {"mode": "roundtrip", "in": str(src), "out": str(out), "info": str(tmp_path / "big.json")}
    run_driver(tmp_path, [job], timeout=300)
    assert "error" not in load_info(job)
    got = read_stream(out)
    assert got.column("f").combine_chunks().equals(table.column("f").combine_chunks())
    assert got.column("i").cast(pa.int64()).to_numpy().tolist() == ints.tolist()


def int64_cases(n: int = 400) -> dict:
    """int64 columns around the edges the codec's fast paths test for: all in
    [0, 2^31) (the int path), one value at or past a bound (2^31, -1, 2^52,
    2^53), a zero (+0) next to the pattern of -0 (-2^63), nulls, all null."""
    small = lambda: RNG.integers(0, 2**31, n)
    cases = {"small": small(), "small_zero": np.append(small(), 0)}
    for name, v in (("at_2_31", 2**31), ("at_2_31_less_1", 2**31 - 1), ("minus_1", -1),
                    ("at_2_52", 2**52), ("at_2_53", 2**53), ("neg_2_31", -2**31),
                    ("neg_2_31_plus_1", -2**31 + 1), ("min_int64", -2**63),
                    ("past_2_53", 2**53 + 1)):
        vals = small()
        vals[RNG.integers(0, n)] = v
        cases[name] = vals
    cases["negative_small"] = RNG.integers(-2**31 + 1, 2**31, n)
    cases["wide"] = RNG.integers(-2**62, 2**62, n)
    return cases


def test_int64_around_the_fast_paths_bounds(tmp_path):
    """Read (R doubles, correctly rounded) and written back as int64 (exact
    within 2^53), against pyarrow's own values."""
    jobs, want = [], {}
    for name, vals in int64_cases().items():
        for nulls in (False, True):
            m = mask(len(vals)) if nulls else None
            arr = pa.array(vals, pa.int64(), mask=m)
            tag = f"{name}-{nulls}"
            src = tmp_path / f"i64-{tag}.arrow"
            write_stream(src, pa.table({"i": arr}).to_batches(max_chunksize=150),
                         pa.schema([("i", pa.int64())]))
            exact = bool(np.all(np.abs(vals.astype(object)) <= 2**53))
            job = {"mode": "roundtrip", "in": str(src), "out": str(tmp_path / f"o-{tag}.arrow"),
                   "out64": str(tmp_path / f"o64-{tag}.arrow"), "as_int64": exact,
                   "info": str(tmp_path / f"i-{tag}.json")}
            jobs.append(job)
            want[tag] = (job, arr, exact)
    jobs.append({"mode": "roundtrip", "in": str(tmp_path / "allnull.arrow"),
                 "out": str(tmp_path / "o-allnull.arrow"),
                 "out64": str(tmp_path / "o64-allnull.arrow"),
                 "as_int64": True, "info": str(tmp_path / "i-allnull.json")})
    write_stream(tmp_path / "allnull.arrow", pa.table({"i": pa.nulls(5, pa.int64())}))
    want["allnull"] = (jobs[-1], pa.nulls(5, pa.int64()), True)
    run_driver(tmp_path, jobs)
    for tag, (job, arr, exact) in want.items():
        assert "error" not in load_info(job), (tag, load_info(job))
        got = read_stream(job["out"]).column("i").combine_chunks()
        doubles = [None if v is None else float(v) for v in arr.to_pylist()]
        assert got.cast(pa.float64()).to_pylist() == doubles, tag
        if exact:
            back = read_stream(job["out64"]).column("i").combine_chunks()
            assert back.type == pa.int64() and back.to_pylist() == arr.to_pylist(), tag


def test_known_values(tmp_path):
    """Values as R sees them: NaN vs NA, +-Inf, empty strings, UTF-8, dates
    before 1970, timestamps with microseconds and zones, int64 beyond 2^53,
    int64 = "character", dictionaries, decimals, legacy framing, deltas."""
    ny = "America/New_York"
    t_us = [dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
            dt.datetime(2024, 3, 10, 7, 30, 0, 123456, tzinfo=dt.timezone.utc),
            None,
            dt.datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=dt.timezone.utc)]
    ns_vals = [1_700_000_000_123_456_789, -1, None, 0]
    big64 = [2**53 + 1, -(2**63), None, 2**63 - 1]
    bigu64 = [2**64 - 1, 2**53, None, 0]
    dec38 = [decimal.Decimal("12345678901234567890.1234567890"), decimal.Decimal("-0.0000000001"), None,
             decimal.Decimal("-99999999999999999999999999.9999999999")]
    table = pa.table({
        "f64": pa.array([1.5, float("nan"), None, float("inf")]),
        "f64b": pa.array([float("-inf"), -0.0, 2.0**-1074, 1.7976931348623157e308]),
        "s": pa.array(["", None, "héllo", "中文😀"]),
        "d": pa.array([-1, -25567, None, 19782], pa.int32()).cast(pa.date32()),
        "ts_ny": pa.array(t_us, pa.timestamp("us", ny)),
        "ts_naive": pa.array([v.replace(tzinfo=None) if v else None for v in t_us], pa.timestamp("us")),
        "ts_ns": pa.array(ns_vals, pa.int64()).cast(pa.timestamp("ns", "UTC")),
        "i64": pa.array(big64, pa.int64()),
        "u64": pa.array(bigu64, pa.uint64()),
        "small64": pa.array([-5, 0, None, 2**53], pa.int64()),
        "dict": pa.array(["b", None, "a", "b"]).dictionary_encode(),
        "dec38": pa.array(dec38, pa.decimal128(38, 10)),
        "bin": pa.array([b"", None, b"\x00\xff", b"abc"]),
    })
    src = tmp_path / "known.arrow"
    write_stream(src, table)
    legacy = tmp_path / "legacy.arrow"
    write_stream(legacy, table, options=pa.ipc.IpcWriteOptions(use_legacy_format=True))
    # a dictionary delta: the second batch extends the dictionary
    dtype = pa.dictionary(pa.int32(), pa.string())
    b1 = pa.record_batch([pa.DictionaryArray.from_arrays(pa.array([0, 1, None], pa.int32()), pa.array(["x", "y"]))],
                         names=["c"])
    b2 = pa.record_batch([pa.DictionaryArray.from_arrays(pa.array([2, 0], pa.int32()), pa.array(["x", "y", "zé"]))],
                         names=["c"])
    delta = tmp_path / "delta.arrow"
    write_stream(delta, [b1, b2], pa.schema([("c", dtype)]),
                 options=pa.ipc.IpcWriteOptions(emit_dictionary_deltas=True))
    # zero columns with rows; duplicate and non-syntactic names
    nocols = tmp_path / "nocols.arrow"
    write_stream(nocols, pa.table({"a": [1, 2, 3]}).select([]))
    dup = tmp_path / "dup.arrow"
    write_stream(dup, pa.Table.from_arrays([pa.array([1, 2]), pa.array(["u", "v"]), pa.array([True, None])],
                                           names=["x", "x", "a b-é"]))
    jobs = [
        {"mode": "values", "in": str(src), "info": str(tmp_path / "v1.json")},
        {"mode": "values", "in": str(src), "info": str(tmp_path / "v2.json"), "int64": "character",
         "factors": True},
        {"mode": "values", "in": str(legacy), "info": str(tmp_path / "v3.json"), "raw": True},
        {"mode": "values", "in": str(delta), "info": str(tmp_path / "v4.json"), "factors": True},
        {"mode": "values", "in": str(delta), "info": str(tmp_path / "v5.json")},
        {"mode": "values", "in": str(nocols), "info": str(tmp_path / "v6.json")},
        {"mode": "values", "in": str(dup), "info": str(tmp_path / "v7.json")},
    ]
    run_driver(tmp_path, jobs)
    v1, v2, v3, v4, v5, v6, v7 = (load_info(j) for j in jobs)
    for v in (v1, v2, v3):
        assert "error" not in v, v
    val = v1["values"]
    assert val["f64"] == ["1.5", "NaN", "NA", "Inf"]
    assert val["f64b"] == ["-Inf", "-0", "4.9406564584124654e-324", "1.7976931348623157e+308"]
    assert val["s"]["values"] == ["", None, "héllo", "中文😀"]
    assert val["s"]["bytes"][2:] == [len("héllo".encode()), len("中文😀".encode())]
    assert val["s"]["enc"][2:] == ["UTF-8", "UTF-8"]
    assert val["d"] == ["1969-12-31", "1900-01-01", None, "2024-02-29"]
    assert val["ts_ny"]["tzone"] == ny
    want_us = [None if v is None else str((v - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))
                                          // dt.timedelta(microseconds=1)) for v in t_us]
    assert val["ts_ny"]["us"] == want_us
    assert val["ts_ny"]["wall"][1] == "2024-03-10 03:30:00"       # EDT began at 2:00 that day
    assert val["ts_naive"]["tzone"] == "UTC"
    assert val["ts_naive"]["us"] == want_us
    assert val["ts_naive"]["wall"][0] == "1969-12-31 23:59:59"
    secs = [None if v is None else float(v) for v in val["ts_ns"]["secs"]]
    assert secs[0] == pytest.approx(1_700_000_000.123456789, abs=1e-6)
    assert secs[1] == pytest.approx(-1e-9, abs=1e-12)
    assert secs[2] is None and secs[3] == 0.0
    # int64 beyond 2^53: doubles, one warning per affected column
    assert [None if x == "NA" else float(x) for x in val["i64"]] == [float(v) if v is not None else None
                                                                    for v in big64]
    assert [None if x == "NA" else float(x) for x in val["u64"]] == [float(v) if v is not None else None
                                                                    for v in bigu64]
    assert len(v1["warnings"]) == 3
    assert "'i64'" in v1["warnings"][0] and "2^53" in v1["warnings"][0]
    assert "'u64'" in v1["warnings"][1]
    assert "'dec38'" in v1["warnings"][2] and "lost precision" in v1["warnings"][2]
    assert val["small64"] == ["-5", "0", "NA", "9007199254740992"]
    assert val["dict"]["values"] == ["b", None, "a", "b"]
    assert val["dec38"][2] == "NA"
    for k in (0, 1, 3):
        assert float(val["dec38"][k]) == pytest.approx(float(dec38[k]), rel=1e-15)
    assert val["bin"] == ["", None, "00ff", "616263"]
    # int64 = "character": exact decimal strings, no warning for them (the wide
    # decimal still becomes a double, and says so); factors = TRUE
    val2 = v2["values"]
    assert len(v2["warnings"]) == 1 and "'dec38'" in v2["warnings"][0]
    assert val2["i64"]["values"] == [None if v is None else str(v) for v in big64]
    assert val2["u64"]["values"] == [None if v is None else str(v) for v in bigu64]
    assert val2["small64"]["values"] == ["-5", "0", None, "9007199254740992"]
    assert v2["classes"][v2["names"].index("dict")] == "factor"
    assert val2["dict"] == {"levels": ["b", "a"], "codes": [1, None, 2, 1]}
    # legacy framing (no continuation marker), read from a raw vector
    assert v3["values"] == val
    # dictionary deltas across batches
    assert v4["nrow"] == 5 and v4["values"]["c"] == {"levels": ["x", "y", "zé"], "codes": [1, 2, None, 3, 1]}
    assert v5["values"]["c"]["values"] == ["x", "y", None, "zé", "x"]
    # zero columns keep the row count; names are kept verbatim
    assert v6["nrow"] == 3 and v6["ncol"] == 0
    assert v7["names"] == ["x", "x", "a b-é"] and v7["nrow"] == 2


# ---------------------------------------------------------------------------
# R -> pyarrow: R-native data frames

def test_r_writes(tmp_path):
    frames = ["types", "types0", "nocols", "empty", "big", "dup"]
    jobs = [{"mode": "rwrite", "frame": f, "out": str(tmp_path / f"{f}.arrow"),
             "info": str(tmp_path / f"{f}.json")} for f in frames]
    # string/binary data past the 32-bit offsets (here lowered to 100 bytes):
    # the writer splits the batch, down to a single value, which is an error
    limited = [{"mode": "rwrite", "frame": f, "out": str(tmp_path / f"{f}.arrow"),
                "info": str(tmp_path / f"{f}.json"), "max_offset": 100} for f in ("split", "toolong")]
    run_driver(tmp_path, jobs + limited)
    with pa.OSFile(str(tmp_path / "split.arrow"), "rb") as f:
        batches = list(pa.ipc.open_stream(f))
    assert len(batches) > 1
    for b in batches:
        assert sum(len(v) for v in b.column("s").to_pylist() if v is not None) <= 100
        assert sum(len(v) for v in b.column("bin").to_pylist()) <= 100
    split = pa.Table.from_batches(batches)
    assert split.column("i").to_pylist() == list(range(1, 11))
    assert split.column("s").to_pylist() == [None if k == 4 else f"{k:040d}" for k in range(1, 11)]
    assert split.column("bin").to_pylist() == [bytes([k] * 30) for k in range(1, 11)]
    toolong = load_info(limited[1])
    assert "single value holds more than 2 GiB" in toolong["error"] and toolong["column"] == "s"
    infos = {f: load_info(j) for f, j in zip(frames, jobs)}
    for f, info in infos.items():
        assert "error" not in info, (f, info)
    t = read_stream(tmp_path / "types.arrow")
    assert t.schema.names == ["i", "d", "s", "b", "f", "dt", "ts", "ts_notz", "bin", "asis"]
    # the factor travels as a dictionary of its levels (in order, unused ones too)
    assert t.schema.field("f").type == pa.dictionary(pa.int32(), pa.string())
    assert t.column("f").chunk(0).dictionary.to_pylist() == ["lo", "hi", "ü"]
    written = t.schema
    t = t.set_column(4, "f", t.column("f").cast(pa.string()))
    assert t.schema.types == [pa.int32(), pa.float64(), pa.string(), pa.bool_(), pa.string(), pa.date32(),
                              pa.timestamp("us", "Asia/Tokyo"), pa.timestamp("us", "UTC"), pa.binary(),
                              pa.int32()]
    assert t.column("i").to_pylist() == [1, None, -3, 2147483647, -2147483647, 0, 42]
    d = t.column("d").to_pylist()
    assert d[0] == 1.5 and np.isnan(d[1]) and d[2] is None and d[3] == float("inf") and d[4] == float("-inf")
    assert d[5] == -0.25 and d[6] == 1e300
    assert t.column("s").to_pylist() == ["a", "", None, "héllo", "中文😀", "tab\there", "z"]
    assert t.column("b").to_pylist() == [True, False, None, True, True, False, None]
    assert t.column("f").to_pylist() == ["lo", "hi", None, "hi", "ü", "lo", "lo"]
    assert t.column("dt").to_pylist() == [dt.date(1969, 12, 31), dt.date(1900, 1, 1), None, dt.date(2024, 2, 29),
                                          dt.date(1970, 1, 1), dt.date(2262, 4, 11), dt.date(1583, 1, 1)]
    us = t.column("ts").cast(pa.int64()).to_pylist()
    assert us == [-1_500_000, 0, None, 1_700_000_000_123_456, 1_000_000_000_000_001, -2_208_988_800_000_000,
                  4_102_444_800_500_000]
    assert t.column("ts_notz").cast(pa.int64()).to_pylist() == [1_000_000, 2_250_000, None, 3_000_000,
                                                                4_000_000, 5_000_000, 6_000_000]
    assert t.column("bin").to_pylist() == [b"\x00\x01\xff", None, b"", b"abc", b"\x00", None, b"\x07"]
    assert infos["types"]["self_identical"] is False     # factor -> character, I() dropped
    t0 = read_stream(tmp_path / "types0.arrow")
    assert t0.num_rows == 0 and t0.schema == written
    nc = read_stream(tmp_path / "nocols.arrow")
    assert nc.num_columns == 0 and nc.num_rows == 7
    em = read_stream(tmp_path / "empty.arrow")
    assert em.num_columns == 0 and em.num_rows == 0
    with pa.OSFile(str(tmp_path / "big.arrow"), "rb") as f:
        reader = pa.ipc.open_stream(f)
        batches = list(reader)
    assert [b.num_rows for b in batches] == [65536, 65536, 150000 - 2 * 65536]
    big = pa.Table.from_batches(batches)
    assert big.column("i").to_pylist() == list(range(1, 150001))
    assert big.column("d").to_pylist() == [i * 0.5 for i in range(1, 150001)]
    s = big.column("s").to_pylist()
    assert s[0] is None and s[1] == "s2" and s[149999] == "s150000" and s.count(None) == 150
    for f in ("big", "nocols", "empty", "dup"):
        assert infos[f]["self_identical"] is True, f
    dup = read_stream(tmp_path / "dup.arrow")
    assert dup.column_names == ["a", "a", "not syntactic é"]
    assert dup.column(2).to_pylist() == [True, None]
    assert dup.column(0).to_pylist() == [1, 2]
    assert dup.column(1).to_pylist() == ["x", "y"]


LAYOUT_R = r'''
invisible(compiler::enableJIT(0L))
source(file.path(commandArgs(trailingOnly = TRUE)[1L], "arrow_ipc.R"))
set.seed(7)
kinds <- list(function(n) sample(c(1:5, NA), n, TRUE), function(n) runif(n),
              function(n) sample(c("a", "b\u00e9", NA), n, TRUE),
              function(n) sample(c(TRUE, FALSE, NA), n, TRUE),
              function(n) factor(sample(c("x", "y", NA), n, TRUE)),
              function(n) as.Date("2024-01-01") + sample(c(0:9, NA), n, TRUE))
for (i in 1:300) {
  n <- sample(c(0:3, 100, 70000), 1L)
  k <- sample(0:6, 1L)
  cols <- lapply(sample(kinds, k, TRUE), function(f) f(n))
  df <- structure(cols, names = sprintf("c%d", seq_len(k)), row.names = .set_row_names(n),
                  class = "data.frame")
  p <- .ai_batch_parts(arrow_prepare_frame(df), NULL, n)
  if (!identical(.ai_batch_meta(p), .ai_message(3L, .ai_record_batch_table(p), p$length)))
    stop(sprintf("frame %d (%d rows, %d columns): the patched metadata differs", i, n, k))
}
cat(length(.ai_batch_layouts), "\n")
'''


def test_record_batch_metadata_patched_in_place_equals_a_fresh_build(tmp_path):
    """The writer builds a record batch's metadata once per layout (numbers of
    field nodes and buffers) and then writes each batch's values in place:
    for 300 random frames (column kinds, nulls, row counts) the bytes equal
    the flatbuffer builder's own for that batch."""
    script = tmp_path / "layout.R"
    script.write_text(LAYOUT_R, encoding="utf-8")
    res = subprocess.run([RSCRIPT, "--vanilla", str(script), RDIR], capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    layouts = int(res.stdout.split()[-1])
    assert 1 < layouts < 300          # layouts were met again, with other values


def test_dictionaries_both_ways(tmp_path):
    """Dictionaries: pyarrow -> R with a new dictionary in every batch (as the
    Worker sends repeated strings), indices of 8, 16 and 64 bits, nulls in the
    indices and an empty dictionary; R -> pyarrow for factors and repeated
    strings, across frames whose columns switch between plain and dictionary."""
    rng = np.random.default_rng(3)
    batches, plain = [], []
    for b, k in enumerate((3, 1, 50, 0)):
        n = 1000 + b
        words = [f"w{b}-{i}é" for i in range(k)]
        idx = rng.integers(0, max(k, 1), n)
        valid = rng.random(n) > 0.1 if k else np.zeros(n, bool)
        vals = [words[i] if ok else None for i, ok in zip(idx, valid)]
        plain.append(pa.array(vals, pa.string()))
        col = pa.array(vals, pa.string()).dictionary_encode()
        batches.append(pa.record_batch([col, pc.cast(col, pa.dictionary(pa.int8(), pa.string())),
                                        pc.cast(col, pa.dictionary(pa.int16(), pa.string())),
                                        pc.cast(col, pa.dictionary(pa.int64(), pa.string()))],
                                       names=["d32", "d8", "d16", "d64"]))
    src = tmp_path / "replaced.arrow"
    write_stream(src, batches, batches[0].schema)
    out = tmp_path / "replaced-out.arrow"
    bad = []                       # indices past either end of the dictionary: codec errors
    for i, (idx, itype) in enumerate((([0, 5, None], pa.int32()), ([-1, 0], pa.int8()))):
        col = pa.DictionaryArray.from_arrays(pa.array(idx, itype), pa.array(["a"]), safe=False)
        bad.append(tmp_path / f"bad-index-{i}.arrow")
        write_stream(bad[-1], [pa.record_batch([col], names=["c"])], pa.schema([("c", col.type)]))
    jobs = [{"mode": "values", "in": str(src), "info": str(tmp_path / "rv.json")},
            {"mode": "roundtrip", "in": str(src), "out": str(out), "info": str(tmp_path / "rr.json")},
            {"mode": "rstream", "frames": ["rep_a", "rep_b", "rep_a"], "out": str(tmp_path / "rs.arrow"),
             "info": str(tmp_path / "rs.json")}]
    bad_jobs = [{"mode": "values", "in": str(p), "info": str(p) + ".json"} for p in bad]
    run_driver(tmp_path, jobs + bad_jobs)
    rv, rr, rs = (load_info(j) for j in jobs)
    for job in bad_jobs:
        info = load_info(job)
        assert "dictionary index out of range" in info["error"] and info["column"] == "c", info
    want = pa.chunked_array(plain).to_pylist()
    assert "error" not in rv, rv
    for name in ("d32", "d8", "d16", "d64"):
        assert rv["values"][name]["values"] == want, name
        assert rv["classes"][rv["names"].index(name)] == "character"
    back = read_stream(out)
    for name in back.column_names:
        assert_same_array(back.column(name).combine_chunks(), pa.array(want, pa.string()), name)
    assert "error" not in rs, rs
    with pa.OSFile(str(tmp_path / "rs.arrow"), "rb") as f:
        reader = pa.ipc.open_stream(f)
        got = reader.read_all()
    # the first frame fixes the column types: rs and f dictionaries, us plain
    # (20,000 distinct), allna plain (no value to repeat)
    assert got.schema.types == [pa.dictionary(pa.int32(), pa.string()), pa.string(),
                                pa.dictionary(pa.int32(), pa.string()), pa.string()]
    n_a, n_b = 20000, 3000
    rs_col = got.column("rs").cast(pa.string()).to_pylist()
    assert rs_col[:n_a].count(None) == 3 and rs_col[0] is None and rs_col[499] is None
    assert set(rs_col[:n_a]) - {None} <= {"ké", "", "b", "tab\there", "😀"}
    assert rs_col[n_a:n_a + n_b] == [f"v{i}" for i in range(1, n_b + 1)]
    assert rs_col[n_a + n_b:] == rs_col[:n_a]
    us = got.column("us").to_pylist()
    assert us[:n_a] == [f"u{i:06d}" for i in range(1, n_a + 1)]
    assert us[n_a:n_a + n_b] == ["p", "q"] * 1500
    f = got.column("f").cast(pa.string()).to_pylist()
    assert f[1] is None and set(f[:n_a]) - {None} == {"x", "y"}
    assert f[n_a:n_a + n_b] == ["new", None] * 1500 and f[n_a + n_b:] == f[:n_a]
    assert got.column("allna").to_pylist() == [None] * n_a + ["z", None] * 1500 + [None] * n_a


# ---------------------------------------------------------------------------
# Errors: unsupported types, unwritable columns, truncated and corrupt streams

def test_codec_errors(tmp_path):
    good = all_types_table(50).select(["int32", "utf8", "float64"])
    buf = pa.BufferOutputStream()
    with pa.ipc.new_stream(buf, good.schema) as w:
        w.write_table(good)
    data = buf.getvalue().to_pybytes()
    cases = {}

    def add(name, payload, **kw):
        p = tmp_path / f"{name}.arrow"
        p.write_bytes(payload)
        cases[name] = ({"mode": "error", "in": str(p), "info": str(tmp_path / f"{name}.json"), **kw})

    add("trunc_body", data[: len(data) - 300])
    add("trunc_header", data[:6])
    add("trunc_no_eos_mid", data[: len(data) - 8 - 3])
    add("empty", b"")
    add("garbage", bytes(RNG.integers(0, 256, 500, dtype=np.uint8)))
    meta_len = struct.unpack("<i", data[4:8])[0]
    add("huge_meta", b"\xff\xff\xff\xff" + struct.pack("<i", 2**30) + data[8:])
    corrupt = bytearray(data)
    corrupt[8:8 + meta_len] = b"\xab" * meta_len
    add("corrupt_meta", bytes(corrupt))
    add("corrupt_raw", bytes(corrupt), raw=True)
    for name, typ, vals in [("list", pa.list_(pa.int32()), [[1, 2], None]),
                            ("time", pa.time32("ms"), [1, None]),
                            ("struct", pa.struct([("a", pa.int32())]), [{"a": 1}, None])]:
        t = pa.table({"ok": [1, 2], f"bad_{name}": pa.array(vals, typ)})
        b = pa.BufferOutputStream()
        with pa.ipc.new_stream(b, t.schema) as w:
            w.write_table(t)
        add(f"type_{name}", b.getvalue().to_pybytes())
    b = pa.BufferOutputStream()
    with pa.ipc.new_stream(b, good.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(good)
    add("compressed", b.getvalue().to_pybytes())
    jobs = list(cases.values())
    for what in ("complex", "difftime", "listcol"):
        jobs.append({"mode": "badwrite", "what": what, "info": str(tmp_path / f"bw-{what}.json")})
    jobs.append({"mode": "roundtrip", "in": cases["trunc_body"]["in"].replace("trunc_body", "ok"),
                 "out": str(tmp_path / "ok-out.arrow"), "info": str(tmp_path / "ok.json")})
    (tmp_path / "ok.arrow").write_bytes(data)
    run_driver(tmp_path, jobs, timeout=60)
    res = {n: load_info(j) for n, j in cases.items()}
    for name, info in res.items():
        assert "error" in info, (name, info)
    assert "truncated Arrow stream" in res["trunc_body"]["error"]
    assert "truncated Arrow stream" in res["trunc_header"]["error"]
    assert "truncated Arrow stream" in res["trunc_no_eos_mid"]["error"]
    assert "empty Arrow stream" in res["empty"]["error"]
    assert "arrow_stream_error" in res["garbage"]["error_class"]
    assert "implausible metadata length" in res["huge_meta"]["error"] or \
        "truncated" in res["huge_meta"]["error"]
    assert "arrow_stream_error" in res["corrupt_meta"]["error_class"]
    assert "arrow_stream_error" in res["corrupt_raw"]["error_class"]
    for name, typ in (("list", "list"), ("time", "time32[ms]"), ("struct", "struct")):
        info = res[f"type_{name}"]
        assert info["error_class"][0] == "arrow_codec_error"
        assert info["column"] == f"bad_{name}"
        assert f"column 'bad_{name}'" in info["error"] and typ in info["error"]
    assert "compress" in res["compressed"]["error"]
    bw = {w: load_info({"info": str(tmp_path / f"bw-{w}.json")}) for w in ("complex", "difftime", "listcol")}
    assert bw["complex"]["column"] == "cplx" and "complex" in bw["complex"]["error"]
    assert bw["difftime"]["column"] == "dt" and "difftime" in bw["difftime"]["error"]
    assert bw["listcol"]["column"] == "l" and "raw vector" in bw["listcol"]["error"]
    ok = load_info({"info": str(tmp_path / "ok.json")})
    assert "error" not in ok and ok["nrow"] == 50


def test_truncated_stream_exits_nonzero(tmp_path):
    t = pa.table({"x": list(range(1000))})
    b = pa.BufferOutputStream()
    with pa.ipc.new_stream(b, t.schema) as w:
        w.write_table(t)
    p = tmp_path / "t.arrow"
    p.write_bytes(b.getvalue().to_pybytes()[:-100])
    res = run_driver(tmp_path, [{"mode": "strict", "in": str(p)}], timeout=30, check=False)
    assert res.returncode != 0
    assert b"truncated Arrow stream" in res.stderr


# ---------------------------------------------------------------------------
# child.R against a real socket server speaking the protocol

class Peer:
    """The worker side of one child connection (reads through a buffered file
    so that pyarrow can read the OUTPUT stream from the same byte source)."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.rfile = conn.makefile("rb")

    def read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise protocol.PeerClosed(f"closed after {len(data)} of {n} bytes")
        return data

    def recv(self, max_bytes=protocol.MAX_FRAME_BYTES):
        t, n = struct.unpack(">iI", self.read_exact(protocol.HEADER_BYTES))
        assert t in protocol.MESSAGE_NAMES, t
        assert n <= max_bytes
        return protocol.MESSAGE_NAMES[t], self.read_exact(n) if n else b""

    def send(self, t, payload=b""):
        protocol.send_frame(self.conn, t, payload)

    def send_json(self, t, obj):
        protocol.send_json(self.conn, t, obj)

    def close(self):
        self.conn.shutdown(socket.SHUT_RDWR)
        self.rfile.close()
        self.conn.close()

    def read_arrow(self) -> pa.Table:
        return pa.ipc.open_stream(self.rfile).read_all()

    def run_task(self, closure: str, table: pa.Table, context=None, options=None, packages=(),
                 partition=0, closure_hash=None, **extra):
        task = {"partition": partition, "task_id": f"t{partition}",
                "options": options or {"int64": "double", "factors": False},
                "context": context, "packages": list(packages), **extra}
        if closure_hash is not None:
            task["closure_hash"] = closure_hash
        self.send_json(protocol.TASK, task)
        self.send(protocol.CLOSURE, closure.encode("utf-8"))
        self.send(protocol.INPUT)
        buf = pa.BufferOutputStream()
        with pa.ipc.new_stream(buf, table.schema) as w:
            w.write_table(table)
        self.conn.sendall(buf.getvalue().to_pybytes())
        logs, out = [], None
        while True:
            name, payload = self.recv()
            if name == "LOG":
                logs.append(json.loads(payload))
            elif name == "OUTPUT":
                # columns R returned as read come back named; put them back as the Worker does
                refs = passthrough.input_columns(json.loads(payload) if payload else None)
                reader = pa.ipc.open_stream(self.rfile)
                batches = list(reader)
                if refs:                 # (R names none in a result of no rows)
                    sent = passthrough.SentColumns()
                    for b in table.to_batches():
                        sent.add(b)
                    starts = np.cumsum([0] + [b.num_rows for b in batches])
                    batches = [p for b, start in zip(batches, starts)
                               for p in passthrough.splice(b, refs, sent, int(start))]
                out = pa.Table.from_batches(batches, schema=None if refs else reader.schema)
            elif name == "DONE":
                return {"logs": logs, "output": out, "done": json.loads(payload)}
            elif name == "ERROR":
                return {"logs": logs, "error": json.loads(payload)}
            else:
                raise AssertionError(f"unexpected {name}")


class ChildServer:
    def __init__(self):
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.srv.settimeout(60)
        self.secret = secrets.token_hex(protocol.SECRET_BYTES)
        env = dict(os.environ)
        env[protocol.ENV_PORT] = str(self.srv.getsockname()[1])
        env[protocol.ENV_HOST] = "127.0.0.1"
        self.proc = subprocess.Popen([RSCRIPT, "--vanilla", CHILD_R], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.proc.stdin.write((self.secret + "\n").encode("ascii"))
        self.proc.stdin.flush()        # kept open: as for a Worker, EOF means "Worker gone"

    def accept(self) -> Peer:
        conn, _ = self.srv.accept()
        conn.settimeout(60)
        return Peer(conn)

    def handshake(self) -> tuple[Peer, dict]:
        peer = self.accept()
        t, auth = peer.recv(protocol.MAX_AUTH_BYTES)
        assert t == "AUTH" and hmac.compare_digest(auth, self.secret.encode("ascii"))
        t, hello = peer.recv(protocol.MAX_AUTH_BYTES)
        assert t == "HELLO"
        hello = json.loads(hello)
        peer.send_json(protocol.WELCOME, {"protocol": protocol.PROTOCOL_VERSION})
        t, log = peer.recv()
        assert t == "LOG" and json.loads(log) == {"level": "INFO", "role": "RScript",
                                                  "message": "is connected to backend"}
        return peer, hello

    def finish(self, timeout=30):
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdin.close()        # ends the child's stdin watch
            self.srv.close()
        return rc, self.proc.stdout.read().decode(errors="replace"), self.proc.stderr.read().decode(
            errors="replace")


@pytest.fixture
def child_server():
    """Makes ChildServers; kills any child still running when the test ends."""
    servers = []

    def make() -> ChildServer:
        cs = ChildServer()
        servers.append(cs)
        return cs

    yield make
    for cs in servers:
        if cs.proc.poll() is None:
            cs.proc.kill()
            cs.proc.wait(10)
        cs.srv.close()


def test_child_tasks_over_socket(child_server):
    cs = child_server()
    peer, hello = cs.handshake()
    assert hello["protocol"] == 1 and hello["language"] == "R" and hello["pid"] == cs.proc.pid
    assert hello["runtime"].startswith("R version")

    table = pa.table({"x": pa.array([1, 2, None], pa.int64()), "s": ["a", "é", None]})
    closure = r'''
    function(df, ctx) {
      worker_log("hello ", ctx$name, " ", nrow(df))
      warning("careful")
      data.frame(x2 = df$x * ctx$k, s = toupper(df$s), n = nrow(df), stringsAsFactors = FALSE)
    }'''
    r = peer.run_task(closure, table, context={"k": 2, "name": "ü"})
    msgs = [(lg["level"], lg["role"], lg["message"]) for lg in r["logs"]]
    assert msgs == [
        ("INFO", "RScript", "retrieved 3 rows"),
        ("INFO", "RScript", "retrieved 2 column names"),
        ("INFO", "RClosure", "hello ü 3"),
        ("WARN", "RClosure", "careful"),
        ("INFO", "RScript", "applied closure to 3 rows"),
        ("INFO", "RScript", "returned 3 rows"),
        ("INFO", "RScript", "finished"),
    ]
    assert r["output"].to_pylist() == [{"x2": 2.0, "s": "A", "n": 3}, {"x2": 4.0, "s": "É", "n": 3},
                                       {"x2": None, "s": None, "n": 3}]
    assert r["done"] == {"rows_in": 3, "rows_out": 3}

    # a one-argument closure returning a scalar; a large input on the same child
    big = pa.table({"v": pa.array(np.arange(100_000, dtype=np.int64)), "w": np.random.default_rng(0).random(100_000)})
    r = peer.run_task("function(df) sum(df$v)", big, partition=1)
    assert r["output"].to_pylist() == [{"result": float(sum(range(100_000)))}]
    assert r["done"] == {"rows_in": 100_000, "rows_out": 1}

    # identity on 100k rows with batches
    r = peer.run_task("function(df) df", big, partition=2)
    assert r["output"].column("v").to_pylist() == [float(v) for v in range(100_000)]
    assert r["output"].column("w").equals(big.column("w"))

    # an R error: ERROR with message, call and traceback; the child keeps serving
    closure = r'''
    function(df) {
      g <- function(z) h(z)
      h <- function(z) stop("boom: ", z)
      g(nrow(df))
    }'''
    r = peer.run_task(closure, table, partition=3)
    err = r["error"]
    assert err["kind"] == "closure" and err["type"] == "simpleError"
    assert err["message"] == "boom: 3"
    assert err["call"] == "h(z)"
    assert err["traceback"][0] == "f(df)"
    assert err["traceback"][1:] == ["g(nrow(df))", "h(z)", 'stop("boom: ", z)']

    # an error raised from C code
    r = peer.run_task('function(df) log("a")', table, partition=4)
    assert r["error"]["kind"] == "closure" and "non-numeric" in r["error"]["message"]
    assert r["error"]["traceback"] == ["f(df)"]

    # not a function; a syntax error; a missing package
    r = peer.run_task("42", table)
    assert r["error"]["kind"] == "closure" and "not a function" in r["error"]["message"]
    r = peer.run_task("function(df) {", table)
    assert r["error"]["kind"] == "closure" and r["error"]["call"] is None
    assert "could not evaluate the closure source" in r["error"]["message"]
    # errors the closure catches itself do not leak into a later traceback
    r = peer.run_task("function(df) { for (i in 1:200) try(stop('caught'), silent = TRUE); "
                      "k <- function() stop('late'); k() }", table)
    assert r["error"]["message"] == "late"
    assert r["error"]["traceback"] == ["f(df)", "k()", 'stop("late")']
    # deep recursion: the traceback keeps its two ends
    r = peer.run_task("function(df) { rec <- function(n) if (n == 0) stop('deep') else rec(n - 1); rec(300) }",
                      table)
    tb = r["error"]["traceback"]
    assert r["error"]["message"] == "deep" and len(tb) == 101
    assert tb[0] == "f(df)" and tb[1] == "rec(300)" and "frames omitted" in tb[50] and tb[-1] == 'stop("deep")'
    assert r["error"]["call"] == "rec(n - 1)"
    r = peer.run_task("function(df) df", table, packages=["surelyNotAnRPackage"])
    assert r["error"]["kind"] == "package"
    assert "surelyNotAnRPackage" in r["error"]["message"] and ".libPaths()" in r["error"]["message"]

    # codec errors: an unsupported input column; an unwritable result column
    bad = pa.table({"ok": [1], "lst": pa.array([[1, 2]], pa.list_(pa.int32()))})
    r = peer.run_task("function(df) df", bad)
    assert r["error"]["kind"] == "codec" and r["error"]["column"] == "lst" and "'lst'" in r["error"]["message"]
    r = peer.run_task("function(df) data.frame(z = complex(real = 1, imaginary = 2))", table)
    assert r["error"]["kind"] == "codec" and r["error"]["column"] == "z"

    # NULL result -> zero-column, zero-row output; zero-row input; `...` gets the context
    r = peer.run_task("function(df) NULL", table)
    assert r["output"].num_columns == 0 and r["output"].num_rows == 0
    assert r["done"] == {"rows_in": 3, "rows_out": 0}
    r = peer.run_task("function(...) { a <- list(...); data.frame(n = nrow(a[[1]]), c = a[[2]]$tag) }",
                      table.slice(0, 0), context={"tag": "t"})
    assert r["output"].to_pylist() == [{"n": 0, "c": "t"}]
    r = peer.run_task("function(df) list(a = 1:2, b = c('x', 'y'))", table,
                      options={"int64": "character", "factors": True})
    assert r["output"].to_pylist() == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    # a result that is no table: kind "result"
    r = peer.run_task("function(df) list(a = 1:2, b = 1:3)", table)
    assert r["error"]["kind"] == "result" and "different lengths" in r["error"]["message"]

    peer.send(protocol.BYE)
    rc, out, errtxt = cs.finish()
    assert rc == 0, errtxt


def test_child_worker_options(child_server):
    """What the Python Worker sends besides the basics: closure_hash with an
    empty CLOSURE for a warm child, packages inside options, group_by,
    tag_units, partition_index_param, barrier."""
    cs = child_server()
    peer, _ = cs.handshake()
    table = pa.table({"g": ["a", "b", "a", None, "b"], "k": [1, 1, 1, 2, 1], "v": [1.0, 2.0, 3.0, 4.0, 5.0]})
    code = "function(df, ctx) data.frame(n = nrow(df), total = sum(df$v) * ctx$m)"
    r = peer.run_task(code, table, context={"m": 10}, closure_hash="h1",
                      options={"packages": ["stats", "utils"]})
    assert r["output"].to_pylist() == [{"n": 5, "total": 150.0}]
    # warm: an empty CLOSURE frame means "the closure with this hash"
    r = peer.run_task("", table.slice(0, 2), context={"m": 1}, closure_hash="h1")
    assert r["output"].to_pylist() == [{"n": 2, "total": 3.0}]
    r = peer.run_task("", table, closure_hash="unknown")
    assert r["error"]["kind"] == "closure" and "empty CLOSURE" in r["error"]["message"]
    r = peer.run_task("function(df) df", table, options={"packages": ["surelyNotAnRPackage"]})
    assert r["error"]["kind"] == "package"
    # group_by: whole groups in order of first appearance, NA a group of its own,
    # missing key columns put in front, empty results dropped; tag_units
    code = "function(df) if (df$g[1] %in% 'b') df[0, ] else data.frame(n = nrow(df), s = sum(df$v))"
    r = peer.run_task(code, table, partition=7,
                      options={"group_by": ["g", "k"], "tag_units": True})
    assert r["output"].schema.types[-2:] == [pa.int64(), pa.int64()]
    assert r["output"].to_pylist() == [
        {"g": "a", "k": 1, "n": 2, "s": 4.0, "__wb_partition": 7, "__wb_unit": 0},
        {"g": None, "k": 2, "n": 1, "s": 4.0, "__wb_partition": 7, "__wb_unit": 1}]
    assert r["done"] == {"rows_in": 5, "rows_out": 2}
    assert ("INFO", "RScript", "applied closure to 5 rows in 3 groups") in [
        (lg["level"], lg["role"], lg["message"]) for lg in r["logs"]]
    # partition_index_param and barrier go to parameters of those names
    r = peer.run_task("function(df, ctx, index, barrier) data.frame(i = index, c = ctx, b = barrier$rank)",
                      table, context="x", partition=3, barrier={"rank": 1},
                      options={"partition_index_param": "index"})
    assert r["output"].to_pylist() == [{"i": 3, "c": "x", "b": 1}]
    r = peer.run_task("function(df, index) data.frame(i = index, n = nrow(df))", table, partition=4,
                      options={"partition_index_param": "index"})
    assert r["output"].to_pylist() == [{"i": 4, "n": 5}]
    peer.send(protocol.BYE)
    rc, _, errtxt = cs.finish()
    assert rc == 0, errtxt


def test_child_exits_quietly_on_eof(child_server):
    cs = child_server()
    peer, _ = cs.handshake()
    peer.close()
    rc, _, errtxt = cs.finish()
    assert rc == 0, errtxt


def test_child_protocol_error_exits_nonzero(child_server):
    cs = child_server()
    peer, _ = cs.handshake()
    peer.conn.sendall(protocol.pack_header(99, 0))
    rc, _, errtxt = cs.finish()
    assert rc != 0
    assert "unknown message type 99" in errtxt


def test_child_rejected_secret_exits_nonzero(child_server):
    cs = child_server()
    peer = cs.accept()
    peer.recv(protocol.MAX_AUTH_BYTES)
    peer.close()                        # the worker closes instead of WELCOME
    rc, _, errtxt = cs.finish()
    assert rc != 0
    assert "closed the connection" in errtxt


def test_child_truncated_input_stream_exits_nonzero(child_server):
    cs = child_server()
    peer, _ = cs.handshake()
    peer.send_json(protocol.TASK, {"partition": 0, "task_id": "x", "options": {}, "context": None,
                                   "packages": []})
    peer.send(protocol.CLOSURE, b"function(df) df")
    peer.send(protocol.INPUT)
    t = pa.table({"x": list(range(100))})
    buf = pa.BufferOutputStream()
    with pa.ipc.new_stream(buf, t.schema) as w:
        w.write_table(t)
    peer.conn.sendall(buf.getvalue().to_pybytes()[:-50])
    peer.conn.shutdown(socket.SHUT_WR)          # EOF mid-stream
    rc, _, errtxt = cs.finish()
    assert rc != 0
    assert "truncated Arrow stream" in errtxt
