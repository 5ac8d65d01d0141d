# The link to Python: which interpreter, the workerbridge.driver.rbridge module, calls
# into it that come back as R conditions, and the Arrow codec.
#
# Covers: choosing the Python (python=, option workerbridge.python, env
# WORKERBRIDGE_PYTHON, the checkout's .venv, python3), starting it through
# reticulate, wb_call() (a Python call whose exception becomes an R condition
# of class wb_error), and loading the R child's own Arrow IPC codec
# (rscripts/arrow_ipc.R, found through the Python package) after checking that
# no other user could have written it.  Does not cover: Spark sessions
# (connect.R), data (data.R), closures (closure.R).

.wb <- new.env(parent = emptyenv())

# Evaluated when the package is installed: the directory it was installed
# from.  From a checkout (R CMD INSTALL .), its .venv is the default Python.
.wb_source_dir <- getwd()

wb_python_path <- function(python = NULL) {
  if (is.null(python)) python <- getOption("workerbridge.python")
  if (is.null(python) && nzchar(Sys.getenv("WORKERBRIDGE_PYTHON")))
    python <- Sys.getenv("WORKERBRIDGE_PYTHON")
  if (is.null(python)) {
    venv <- file.path(.wb_source_dir, ".venv", "bin", "python")
    checkout <- file.exists(file.path(.wb_source_dir, "workerbridge", "__init__.py"))
    python <- if (checkout && file.exists(venv)) venv else "python3"
  }
  if (!is.character(python) || length(python) != 1L || !nzchar(python))
    stop("python= must be the path of a Python interpreter (one string)", call. = FALSE)
  found <- if (grepl("/", python, fixed = TRUE)) python else unname(Sys.which(python))
  if (!nzchar(found) || !file.exists(found))
    stop(sprintf(paste0("Python interpreter not found as '%s'; pass python= the interpreter ",
                        "that has workerbridge installed (in a checkout: make setup, then ",
                        "python = '<checkout>/.venv/bin/python')"), python), call. = FALSE)
  # a venv's python must be run by its own path (not the resolved link)
  file.path(normalizePath(dirname(found), mustWork = TRUE), basename(found))
}

# Start Python (once per R session) and import workerbridge.driver.rbridge.
wb_start_python <- function(python) {
  if (reticulate::py_available(initialize = FALSE)) {
    running <- reticulate::py_config()$python
    if (!identical(file.path(normalizePath(dirname(running), mustWork = FALSE), basename(running)),
                   python))
      stop(sprintf(paste0("this R session already runs Python '%s' (reticulate starts one per ",
                          "session); restart R to use '%s'"), running, python), call. = FALSE)
  } else {
    # RETICULATE_PYTHON first: reticulate then looks at no project files
    # (a pyproject.toml in the working directory would make it ask for poetry)
    Sys.setenv(RETICULATE_PYTHON = python)
    reticulate::use_python(python, required = TRUE)
  }
  module <- "workerbridge.driver.rbridge"
  bridge <- tryCatch(reticulate::import(module, convert = FALSE),
                     error = function(e) stop(sprintf(paste0(
                       "the Python at '%s' cannot import workerbridge: %s\nHint: install it ",
                       "there (in a checkout: make setup), or pass python= one that has it"),
                       python, conditionMessage(e)), call. = FALSE))
  .wb$bridge <- bridge
  .wb$python <- python
  invisible(bridge)
}

wb_bridge <- function() {
  if (is.null(.wb$bridge))
    stop("no workerbridge session: call wb_connect() first", call. = FALSE)
  .wb$bridge
}

# Call the Python function `name` of workerbridge.driver.rbridge; its value, converted
# to R, or an R condition carrying the Python exception's text.
wb_call <- function(name, ..., .call = sys.call(-1L)) {
  bridge <- wb_bridge()
  res <- reticulate::py_to_r(bridge$call(reticulate::py_get_attr(bridge, name), ...))
  if (isTRUE(res[[1L]])) return(res[[2L]])
  wb_raise(res[[2L]], .call)
}

# Condition classes by the Python error's kind.
wb_error_classes <- c(BadInputError = "wb_bad_input", ClosureError = "wb_closure_error",
                      LimitError = "wb_limit_error", ChildDiedError = "wb_child_died",
                      TransportError = "wb_transport_error", TaskError = "wb_task_error")

wb_raise <- function(err, call = NULL) {
  kind <- if (is.null(err$kind)) "" else err$kind
  cls <- unname(wb_error_classes[kind])
  if (identical(kind, "LimitError")) cls <- c(cls, "wb_child_died")
  if (kind %in% c("ClosureError", "LimitError", "ChildDiedError", "TransportError"))
    cls <- c(cls, "wb_task_error")
  msg <- wb_task_message(err$message, kind)
  stop(structure(class = c(cls[!is.na(cls)], "wb_error", "error", "condition"),
                 list(message = msg, call = call, python_type = err$type,
                      python_message = err$message)))
}

# A task's error reaches the driver inside Spark's exception text, after the
# executor's Python traceback: keep the workerbridge error itself (the text
# Python shows for it), which names the partition, the language, the child's
# traceback and a hint.
wb_task_message <- function(text, kind) {
  if (!nzchar(kind)) return(text)
  marker <- paste0("workerbridge.wire.errors.", kind, ": ")
  at <- gregexpr(marker, text, fixed = TRUE)[[1L]]
  if (at[1L] < 0L) return(text)
  sub("\\s+$", "", substring(text, at[length(at)] + nchar(marker)))
}

# The R child's Arrow IPC codec, loaded from the Python package's rscripts/.
wb_codec <- function() {
  if (!is.null(.wb$codec)) return(.wb$codec)
  dir <- wb_call("scripts_dir")
  path <- file.path(dir, "arrow_ipc.R")
  wb_check_private(dir)
  wb_check_private(path)
  env <- new.env(parent = baseenv())
  sys.source(path, envir = env, keep.source = FALSE)
  .wb$codec <- env
  env
}

# Refuse to source a file (or use a directory) that is a symbolic link, or that
# another user owns or may write.
wb_check_private <- function(path) {
  info <- file.info(path, extra_cols = TRUE)
  if (is.na(info$size)) stop(sprintf("'%s' does not exist", path), call. = FALSE)
  me <- Sys.info()[["effective_user"]]
  bad <- if (nzchar(Sys.readlink(path))) "is a symbolic link"
         else if (!(info$uname %in% c(me, "root"))) sprintf("belongs to '%s'", info$uname)
         else if (bitwAnd(as.integer(info$mode), strtoi("022", 8L)) != 0L)
           "may be written by other users"
         else NULL
  if (!is.null(bad))
    stop(sprintf("refusing to load '%s': it %s (files workerbridge sources must be yours)",
                 path, bad), call. = FALSE)
  invisible(TRUE)
}
