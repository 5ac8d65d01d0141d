# spark_log() for R users: the lifecycle lines of the session's tasks.
#
# Covers: reading the newest lines the driver's Gateway holds, oldest first.
# Does not cover: the line format (workerbridge/logs.py; the README).

spark_log <- function(sc = NULL, filter = NULL, n = 100) {
  sc <- wb_session(sc)
  if (!is.null(filter) && (!is.character(filter) || length(filter) != 1L))
    stop("filter= takes one string (lines containing it are kept)", call. = FALSE)
  if (!is.null(n) && (!is.numeric(n) || length(n) != 1L || is.na(n) || n < 0))
    stop("n= takes a number of lines (NULL: all)", call. = FALSE)
  lines <- wb_call("logs", sc, filter, if (is.null(n)) NULL else as.integer(n))
  as.character(unlist(lines))
}
