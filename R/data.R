# Data between R and Spark: wb_copy_to() and wb_collect().
#
# Covers: an R data.frame to a Spark DataFrame and back, as an Arrow IPC stream
# written and read by the R child's own codec (rscripts/arrow_ipc.R) on the R
# side and by pyarrow on the Python side; no pandas on the way.  As in
# sparklyr, dots in column names become underscores (Spark reads a dot as a
# struct field).  Does not
# cover: the type mapping itself (the codec; see the README's table).

wb_copy_to <- function(sc, df, repartition = 0L) {
  if (!is.data.frame(df))
    stop(sprintf("df must be a data.frame, not %s", paste(class(df), collapse = "/")), call. = FALSE)
  if (!is.numeric(repartition) || length(repartition) != 1L || is.na(repartition) || repartition < 0)
    stop("repartition= must be a number of partitions (0 keeps Spark's choice)", call. = FALSE)
  names(df) <- gsub(".", "_", names(df), fixed = TRUE)
  if (anyDuplicated(names(df)))
    stop(sprintf("df has duplicate column names (after '.' became '_'): %s",
                 paste(unique(names(df)[duplicated(names(df))]), collapse = ", ")), call. = FALSE)
  codec <- wb_codec()
  bytes <- tryCatch(codec$arrow_write_stream(df),
                    arrow_codec_error = function(e)
                      stop(sprintf("cannot copy the data.frame to Spark: %s", conditionMessage(e)),
                           call. = FALSE))
  wb_call("frame_from_ipc", sc, bytes, as.integer(repartition))
}

wb_collect <- function(x, int64 = c("double", "character")) {
  int64 <- match.arg(int64)
  if (is.data.frame(x)) return(x)
  if (!wb_is_spark_frame(x))
    stop(sprintf("x must be a Spark DataFrame (from wb_copy_to or spark_apply), not %s",
                 paste(class(x), collapse = "/")), call. = FALSE)
  bytes <- wb_call("frame_to_ipc", x)
  wb_codec()$arrow_read_stream(bytes, int64 = int64)
}

wb_is_spark_frame <- function(x) {
  inherits(x, "python.builtin.object") &&
    any(grepl("^pyspark\\.sql\\..*DataFrame$", class(x)))
}
