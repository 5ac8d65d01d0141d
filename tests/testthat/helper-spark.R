# One local Spark session for every test file (started on first use, stopped
# when the tests end), and helpers that build closures in the global
# environment, as a user's script at top level does.

wb_test_python <- function() {
  py <- Sys.getenv("WORKERBRIDGE_PYTHON")
  if (!nzchar(py)) {
    if (identical(Sys.getenv("CI"), "true"))
      stop("WORKERBRIDGE_PYTHON is not set (make test sets it)")
    skip("WORKERBRIDGE_PYTHON is not set: no Python with workerbridge to test against")
  }
  py
}

wb_test_env <- new.env()

test_spark <- function() {
  if (is.null(wb_test_env$sc)) {
    py <- wb_test_python()
    Sys.setenv(SPARK_LOCAL_IP = "127.0.0.1")
    sc <- wb_connect("local[2]", python = py, config = list(
      spark.ui.enabled = FALSE, spark.ui.showConsoleProgress = FALSE,
      spark.driver.host = "127.0.0.1", spark.driver.bindAddress = "127.0.0.1",
      spark.sql.shuffle.partitions = 4, spark.sql.session.timeZone = "UTC",
      spark.task.maxFailures = 1))
    sc$sparkContext$setLogLevel("FATAL")
    wb_test_env$sc <- sc
    withr::defer(wb_disconnect(sc), teardown_env())
  }
  wb_test_env$sc
}

# Evaluate `code` (quoted) in the global environment, where a user's
# top-level script defines its variables and functions.
in_global <- function(code) eval(code, globalenv())

# Remove names from the global environment when the calling test ends.
clean_global <- function(names, env = parent.frame()) {
  withr::defer(suppressWarnings(rm(list = names, envir = globalenv())), envir = env)
}
