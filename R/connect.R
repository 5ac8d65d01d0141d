# Connecting to Spark from R: wb_connect() and wb_disconnect().
#
# Covers: starting the chosen Python, a PySpark SparkSession (local or any
# master, or Spark Connect with remote=) with its config, and making it the
# session the other functions default to.  Does not cover: which Python
# (bridge.R).

wb_connect <- function(master = "local[2]", python = NULL, config = list(), remote = NULL,
                       app_name = "workerbridge") {
  if (!is.null(remote) && (!is.character(remote) || length(remote) != 1L))
    stop("remote= must be a Spark Connect URL such as 'sc://127.0.0.1:15002'", call. = FALSE)
  if (is.null(remote) && (!is.character(master) || length(master) != 1L || !nzchar(master)))
    stop("master= must be a Spark master URL such as 'local[2]'", call. = FALSE)
  if (!is.list(config) || (length(config) && (is.null(names(config)) || any(!nzchar(names(config))))))
    stop("config= must be a named list of Spark settings, e.g. list(spark.sql.shuffle.partitions = 4)",
         call. = FALSE)
  python <- wb_python_path(python)
  wb_start_python(python)
  conf <- lapply(config, function(v) if (is.logical(v)) tolower(as.character(v)) else as.character(v))
  sc <- wb_call("session", master, remote, wb_dict(conf), app_name, python)
  .wb$sc <- sc
  sc
}

wb_disconnect <- function(sc = NULL) {
  sc <- wb_session(sc)
  sc$stop()
  if (identical(sc, .wb$sc)) .wb$sc <- NULL
  invisible(NULL)
}

# sc, or the session of the last wb_connect().
wb_session <- function(sc = NULL) {
  if (!is.null(sc)) return(sc)
  if (is.null(.wb$sc)) stop("no Spark session: call sc <- wb_connect() first", call. = FALSE)
  .wb$sc
}

# A Python dict from a named R list (an empty list too).
wb_dict <- function(x) {
  if (!length(x)) return(reticulate::dict())
  do.call(reticulate::dict, x)
}
