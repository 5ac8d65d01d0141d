"""The R reader makes a partition's strings last and at once (rscripts/arrow_ipc.R,
.ai_bind_string_bytes), after making room for them in R's vector heap
(.ai_make_room), in a child started with room for their nodes (r_heap_args).

Why it matters: every garbage collection visits every string alive and every
entry of R's string cache, so a collection while millions of strings are being
made costs a tenth of a second each.  Two things are held here, with real
Rscript processes:

- the strings are right: the bytes of generated batches (nulls, empty strings,
  non-ASCII, empty batches, offsets that do not start at 0, int64 offsets) bound
  at once equal the per-batch decoder's strings, which is the oracle;
- no collection runs while they are made, in an R started the way the Worker
  starts the child, after the heap was left full of garbage.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from workerbridge.task.worker import r_heap_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEC_R = os.path.join(ROOT, "rscripts", "arrow_ipc.R")
RSCRIPT = shutil.which("Rscript") or "/usr/bin/Rscript"

pytestmark = pytest.mark.skipif(not os.path.exists(RSCRIPT), reason="Rscript not installed")


def rscript(code: str, *args: str, flags: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([RSCRIPT, "--vanilla", *flags, "-e", code, *args],
                          capture_output=True, text=True, timeout=300)


# Random pieces built in R: each a batch's data buffer (padded past its last
# offset, with junk before its first when `lead` > 0), its offsets (int32, or
# doubles as LargeUtf8's are read) and validity.  The oracle decodes each piece
# on its own, as the reader did batch by batch; the piece path binds them.
BIND_R = r'''
source(commandArgs(trailingOnly = TRUE)[1L])
set.seed(7)
alphabet <- c(letters, "", " ", "\u00e9", "\u4e2d", "\U0001F600", "x y")
piece <- function() {
  n <- sample(c(0L, 1L, 2L, 5L, 40L), 1L)
  s <- vapply(seq_len(n), function(i) paste(sample(alphabet, sample(0:4, 1L), TRUE), collapse = ""), "")
  Encoding(s) <- "UTF-8"
  lens <- nchar(s, type = "bytes")
  lead <- sample(c(0L, 0L, 3L), 1L)
  bytes <- c(as.raw(sample(0:255, lead, TRUE)), unlist(lapply(s, charToRaw)), raw(0),
             as.raw(rep(0x55, sample(0:7, 1L))))       # padding past the last offset
  offs <- lead + c(0L, cumsum(lens))
  if (runif(1) < 0.3) offs <- as.numeric(offs)          # LargeUtf8
  valid <- if (n && runif(1) < 0.5) runif(n) > 0.3 else NULL
  .ai_string_bytes(bytes, if (n) offs else 0, n, valid, "s")
}
bad <- 0L
for (case in 1:300) {
  p <- lapply(seq_len(sample(1:6, 1L)), function(i) piece())
  want <- unlist(lapply(p, function(q) .ai_decode_strings(q$data, q$offs, q$n, q$valid, "s")))
  if (is.null(want)) want <- character(0)
  got <- .ai_bind_string_bytes(p, "s")
  same <- identical(got, want) && identical(Encoding(got), Encoding(want))
  if (!same) { bad <- bad + 1L; if (bad < 4L) { str(p); str(want); str(got) } }
}
cat("bad", bad, "\n")
'''


def test_bound_at_once_equals_batch_by_batch():
    r = rscript(BIND_R, CODEC_R)
    assert r.returncode == 0, r.stderr
    assert "bad 0 \n" in r.stdout, r.stdout + r.stderr


# Reads a stream with the heap full of garbage, counting the collections that
# run while the strings are made (gcinfo reports each on stderr).
NO_GC_R = r'''
args <- commandArgs(trailingOnly = TRUE)
source(args[1L])
junk <- numeric(1.2e7); junk[1L] <- 1; rm(junk)   # 96 MB of garbage: the vector heap is full
trace(".ai_decode_strings", print = FALSE, where = globalenv(),
      tracer = quote(message("strings: start")), exit = quote(message("strings: end")))
gcinfo(TRUE)
df <- arrow_read_stream(args[2L])
gcinfo(FALSE)
cat("rows", nrow(df), "last", df$s[nrow(df)], "\n")
'''


def test_no_collection_while_the_strings_are_made(tmp_path):
    rows = 1_200_000                     # past .ai_room_min_strings
    ids = np.arange(rows, dtype=np.int64)
    table = pa.table({"a": ids, "x": ids / 3,
                      "s": pa.array([f"s{i}" for i in range(rows)], pa.string())})
    path = tmp_path / "in.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for b in table.to_batches(max_chunksize=100_000):
            w.write_batch(b)
    r = rscript(NO_GC_R, CODEC_R, str(path), flags=tuple(r_heap_args(None)))
    assert r.returncode == 0, r.stderr
    assert f"rows {rows} last s{rows - 1}" in r.stdout
    phase = r.stderr.split("strings: start", 1)[1].split("strings: end", 1)[0]
    assert "Garbage collection" not in phase, phase[:2000]
