# Benchmark of rscripts/arrow_ipc.R: decode and encode timed separately.
#
#   Rscript --vanilla bench/r_codec_bench.R [stream.arrow]
#
# Without a file, builds 1M rows x (2 integer-valued double, 2 double, 1 string)
# in R (R has no int64); bench/r_codec_bench.py writes a file with real int64
# columns via pyarrow and passes it here.
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)][1L])))
source(file.path(here, "..", "rscripts", "arrow_ipc.R"))
targs <- commandArgs(trailingOnly = TRUE)

if (length(targs)) {
  bytes <- readBin(targs[1L], "raw", file.size(targs[1L]))
} else {
  n <- 1e6
  set.seed(1)
  df <- data.frame(i1 = round(runif(n, -2^40, 2^40)), i2 = round(runif(n, 0, 1000)),
                   d1 = rnorm(n), d2 = runif(n),
                   s = paste0("row-", seq_len(n), ifelse(seq_len(n) %% 7 == 0, "\u00e9", "x")),
                   stringsAsFactors = FALSE)
  bytes <- arrow_write_stream(df)
}
mb <- length(bytes) / 2^20

# fresh: before each timed run the last decode's frame is let go and
# collected, so that a decode makes its strings anew rather than finding them
# in R's string cache (as a task's new rows do)
timeit <- function(expr, reps = 3L, fresh = FALSE) {
  best <- Inf
  for (i in seq_len(reps)) {
    if (fresh) { df <<- NULL; invisible(gc()) }
    t0 <- proc.time()[["elapsed"]]
    force(expr())
    best <- min(best, proc.time()[["elapsed"]] - t0)
  }
  best
}

df <- NULL
t_dec <- timeit(function() df <<- arrow_read_stream(bytes), fresh = TRUE)
t_enc <- timeit(function() arrow_write_stream(df))
t_dec_file <- NA
if (length(targs)) t_dec_file <- timeit(function() df <<- arrow_read_stream(targs[1L]), fresh = TRUE)

cat(sprintf("rows: %d, columns: %d, stream: %.1f MB\n", nrow(df), ncol(df), mb))
cat(sprintf("decode (raw vector):   %.3f s  %.1f MB/s\n", t_dec, mb / t_dec))
if (!is.na(t_dec_file))
  cat(sprintf("decode (file conn.):   %.3f s  %.1f MB/s\n", t_dec_file, mb / t_dec_file))
cat(sprintf("encode (to raw):       %.3f s  %.1f MB/s\n", t_enc, mb / t_enc))
