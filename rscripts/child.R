# The R child ("RScript") of a workerbridge Worker.
#
# Launch:  Rscript --vanilla <dir>/child.R
#   env    WORKERBRIDGE_PORT (required), WORKERBRIDGE_HOST (default 127.0.0.1)
#   stdin  first line: the per-task secret (64 hex characters)
#
# The child connects back to the Worker, authenticates (AUTH, HELLO, WELCOME)
# and then serves tasks until BYE or EOF:
#   TASK -> CLOSURE -> INPUT + Arrow stream  ==>  LOG* -> OUTPUT + Arrow stream -> DONE
#                                               or LOG* -> ERROR
#                (batch mode, a late error:     OUTPUT + stream -> LOG* -> ERROR)
# Exit status: 0 after BYE or EOF while waiting for a TASK; 1 on a protocol
# error (message on stderr); 2 when it cannot start (no port, no secret, ...).
#
# CLOSURE: R source whose value is the function, or (options closure_format
# "serialized") the R package's serialize()d closure, see wb_unserialize_closure.
# TASK fields used: partition, r_lib and options$ship_r (shipped packages,
# rscripts/shipped.R), closure_hash (an empty CLOSURE frame reuses the
# closure received earlier under that hash), context, barrier, packages (top
# level or in options), int64_out (the output schema's int64 columns),
# options: int64 ("double"|"character"), factors,
# batch_rows, group_by (the closure runs per group; missing key columns are put
# in front of each group's result, empty results dropped), tag_units (adds
# int64 columns __wb_partition and __wb_unit), partition_index_param,
# batch_mode ("batch": the closure runs per input record batch and each result
# is streamed back while the input still arrives; LOG frames wait until the
# output stream has ended; an error after the first result batch ends the
# stream and then travels as ERROR).
# ERROR kinds: closure, package, codec (with "column"), result.

local({
  args <- commandArgs(trailingOnly = FALSE)
  file_arg <- args[grep("^--file=", args)]
  if (!length(file_arg)) {
    message("workerbridge child.R: run me as Rscript --vanilla <dir>/child.R")
    quit(save = "no", status = 2L)
  }
  # Rscript writes spaces in the script path as "~+~"
  here <- dirname(normalizePath(gsub("~+~", " ", sub("^--file=", "", file_arg[1L]), fixed = TRUE)))
  # The child's own code lives in an environment of its own (a child of
  # baseenv), so that user closures evaluated under globalenv cannot clash with it.
  wb <- new.env(parent = baseenv())
  sys.source(file.path(here, "protocol.R"), envir = wb, keep.source = FALSE)
  sys.source(file.path(here, "arrow_ipc.R"), envir = wb, keep.source = FALSE)
  sys.source(file.path(here, "shipped.R"), envir = wb, keep.source = FALSE)
  assign(".wb", wb, envir = globalenv())
})

.wb$wb_child_main <- function() {
  # A UTF-8 locale keeps non-ASCII closure source and strings intact.
  if (!isTRUE(l10n_info()[["UTF-8"]])) {
    for (loc in c("C.UTF-8", "en_US.UTF-8", "C.utf8"))
      if (nzchar(suppressWarnings(Sys.setlocale("LC_CTYPE", loc)))) break
  }

  die <- function(msg, status = 1L) {
    message("workerbridge RScript: ", msg)
    quit(save = "no", status = status)
  }

  port <- Sys.getenv(WB_ENV_PORT, "")
  host <- Sys.getenv(WB_ENV_HOST, "")
  if (!nzchar(host)) host <- "127.0.0.1"
  port_num <- suppressWarnings(as.integer(port))
  if (is.na(port_num) || port_num <= 0L || port_num > 65535L)
    die(sprintf("environment variable %s must hold a TCP port, got '%s'", WB_ENV_PORT, port), 2L)

  stdin_con <- file("stdin")
  secret <- tryCatch(readLines(stdin_con, n = 1L, warn = FALSE), error = function(e) character(0))
  close(stdin_con)
  secret <- if (length(secret)) trimws(secret[1L]) else ""
  if (!nzchar(secret)) die("no secret on the first line of stdin", 2L)
  wb_watch_parent()

  con <- tryCatch(
    socketConnection(host = host, port = port_num, blocking = TRUE, open = "r+b",
                     server = FALSE, timeout = 31536000L),
    error = function(e) die(sprintf("cannot connect to %s:%d: %s", host, port_num,
                                    conditionMessage(e)), 2L),
    warning = function(w) die(sprintf("cannot connect to %s:%d: %s", host, port_num,
                                      conditionMessage(w)), 2L))

  # Frames go through a write buffer that is flushed at the points below, so
  # that a task's small frames leave in one write (see wb_buffered_writer).
  out <- wb_buffered_writer(con)
  logs <- wb_log_channel(out$write)
  log_msg <- logs$log

  # -- handshake -------------------------------------------------------------
  tryCatch({
    wb_send_frame(out$write, "AUTH", charToRaw(secret))
    wb_send_json(out$write, "HELLO", list(pid = Sys.getpid(), protocol = WB_PROTOCOL_VERSION,
                                          language = "R", runtime = R.version.string))
    out$flush()
    welcome <- wb_decode_json_payload(wb_expect(con, "WELCOME"))
    if (!is.null(welcome$protocol) && !identical(as.integer(welcome$protocol), WB_PROTOCOL_VERSION))
      stop(wb_protocol_error(sprintf("the worker speaks protocol %s, this child %d",
                                     format(welcome$protocol), WB_PROTOCOL_VERSION)))
    log_msg(wb_lifecycle("connected"))
    out$flush()
  }, error = function(e) {
    if (inherits(e, "wb_peer_closed"))
      die(paste0("the worker closed the connection during the handshake ",
                 "(secret rejected?): ", conditionMessage(e)))
    die(paste0("handshake failed: ", conditionMessage(e)))
  })

  # -- task loop -------------------------------------------------------------
  # The byte-code JIT is off for the child's own code: it compiled the task's
  # nested functions (and the JSON reader's) anew in every task, ~30 ms a
  # warm task (Rprof).  The user's closure runs under the session's level.
  wb_closure_jit <<- compiler::enableJIT(0L)
  cache <- new.env(parent = emptyenv())     # closure_hash -> function (warm reuse)
  baseline <- wb_baseline()
  # WORKERBRIDGE_RPROF=<file>: Rprof of the child's whole life (bench/; not with
  # profile=True), started once: restarted per task, it missed short tasks.
  prof <- Sys.getenv("WORKERBRIDGE_RPROF", "")
  if (nzchar(prof)) utils::Rprof(prof, interval = 0.002, gc.profiling = TRUE)
  dirty <- FALSE
  repeat {
    # R frees memory only when it collects, and the child starts with a large
    # heap (see r_heap_args in worker.py): after a task, once no frame has come
    # for a moment (a warm child waiting in the pool), collect, so that an idle
    # child gives its garbage back.  Back-to-back tasks do not pay for this.
    if (dirty && !isTRUE(tryCatch(socketSelect(list(con), timeout = 0.25),
                                  error = function(e) TRUE))) invisible(gc())
    dirty <- FALSE
    fr <- tryCatch(wb_recv_frame(con), error = function(e) e)
    if (inherits(fr, "wb_peer_closed") && isTRUE(fr$got == 0)) break   # EOF: a normal exit
    if (inherits(fr, "error")) die(paste0("while waiting for a task: ", conditionMessage(fr)))
    if (fr$name == "BYE") break
    if (fr$name != "TASK") die(sprintf("expected TASK or BYE, got %s", fr$name))
    tryCatch({
      task <- wb_decode_json_payload(fr$payload)
      wb_enter_job(baseline, task$job, cache)
      wb_run_task(con, out, task, logs, cache)
      out$flush()
      dirty <- TRUE
    }, error = function(e) {
      try(out$flush(), silent = TRUE)
      die(sprintf("task failed: %s", conditionMessage(e)))
    })
  }
  try(close(con), silent = TRUE)
  if (nzchar(prof)) utils::Rprof(NULL)
  quit(save = "no", status = 0L)
}

# What each new job finds in a warm child: the global environment empty (but
# for .wb), the options, attached packages, working directory and environment
# variables the child started with, and no closure of another job.  Loaded
# (not attached) namespaces are kept: loading them again is what reuse saves.
.wb$wb_baseline <- function() {
  b <- new.env(parent = emptyenv())
  b$options <- options()
  b$search <- search()
  b$wd <- getwd()
  b$env <- Sys.getenv()
  b$job <- NULL
  b
}

.wb$wb_enter_job <- function(b, job, cache) {
  if (identical(job, b$job)) return(invisible(NULL))
  if (!is.null(b$job)) {
    rm(list = setdiff(ls(globalenv(), all.names = TRUE), ".wb"), envir = globalenv())
    for (p in setdiff(search(), b$search)) try(detach(p, character.only = TRUE), silent = TRUE)
    added <- setdiff(names(options()), names(b$options))
    try(options(c(b$options, stats::setNames(vector("list", length(added)), added))),
        silent = TRUE)
    try(setwd(b$wd), silent = TRUE)
    Sys.unsetenv(setdiff(names(Sys.getenv()), names(b$env)))
    if (length(b$env)) do.call(Sys.setenv, as.list(b$env))
  }
  rm(list = ls(cache, all.names = TRUE), envir = cache)
  b$job <- job
  invisible(NULL)
}

# R runs a closure on its one thread, so EOF on stdin (the Worker is gone)
# is watched by a small shell started with pipe(): it inherits our stdin,
# waits for its end, and then kills us, but only while we are still its
# parent (so never a process that took our pid after we exited).  It is in
# our session, so the Worker ends it with us.  Without a shell: no watch
# (the parent-death signal and the socket's EOF still end us).
.wb$wb_watch_parent <- function() {
  if (.Platform$OS.type != "unix" || !nzchar(Sys.which("sh"))) return(invisible(NULL))
  pid <- Sys.getpid()
  cmd <- sprintf(paste0("cat >/dev/null; ",
                        "pp=$(cut -d' ' -f4 /proc/$$/stat 2>/dev/null || ps -o ppid= -p $$); ",
                        "[ \"$pp\" -eq %d ] 2>/dev/null && kill -KILL %d"), pid, pid)
  # kept referenced in our own environment: a collected connection is closed,
  # and closing it would wait for the shell
  assign("wb_watch_con", tryCatch(pipe(cmd, open = "r"), error = function(e) NULL),
         envir = parent.env(environment()))
  invisible(NULL)
}

# LOG frames, which can be held back: while an Arrow stream is being written
# (batch mode, where the closure runs between its batches) log lines wait and
# follow the stream.  Returns list(log(message, level, role), hold(), release()).
.wb$wb_log_channel <- function(write) {
  st <- new.env(parent = emptyenv())
  st$held <- NULL
  send <- function(rec) wb_send_frame(write, "LOG", charToRaw(wb_log_json(rec$level, rec$role, rec$message)))
  log <- function(message, level = "INFO", role = "RScript") {
    rec <- list(level = level, role = role, message = message)
    if (is.null(st$held)) send(rec) else st$held[[length(st$held) + 1L]] <- rec
    invisible(NULL)
  }
  hold <- function() if (is.null(st$held)) st$held <- list()
  release <- function() {
    held <- st$held
    st$held <- NULL
    for (rec in held) send(rec)
    invisible(NULL)
  }
  list(log = log, hold = hold, release = release)
}

# The error payload for a condition `e` of the given kind.
.wb$wb_error_payload <- function(kind, e, traceback = character(0), column = NULL) {
  call <- conditionCall(e)
  out <- list(kind = kind,
              type = class(e)[1L],
              message = conditionMessage(e),
              call = if (is.null(call)) NULL else paste(deparse(call, width.cutoff = 500L, nlines = 5L),
                                                        collapse = "\n"),
              traceback = I(as.character(traceback)))
  if (!is.null(column) && !is.na(column)) out$column <- column
  out
}

.wb$wb_deparse_call <- function(call) {
  s <- paste(deparse(call, width.cutoff = 500L, nlines = 5L), collapse = "\n")
  if (nchar(s) > 1000L) s <- paste0(substr(s, 1L, 1000L), " ...")
  s
}

# The deparsed calls of the closure's frames at an error, from `calls` (the
# sys.calls() seen by the calling handler).  Frames: ... wb_run_task (`base`),
# the run steps with their tryCatch and withCallingHandlers frames
# (wb_run_partition ... wb_run_units, or wb_run_batches ... the reader's
# on_batch), eval, f(df) ... the user's frames ..., [.handleSimpleError], the
# handler: the traceback starts at the first f(...).  Long tracebacks keep
# their ends.
.wb$wb_traceback <- function(calls, base, keep_max = 100L) {
  if (is.null(calls)) return(character(0))
  idx <- seq_along(calls)
  idx <- idx[idx > base]
  heads <- vapply(calls[idx], function(cl) {
    fn <- cl[[1L]]
    if (is.symbol(fn)) as.character(fn) else ""
  }, "")
  first <- which(heads == "f")
  if (length(first)) idx <- idx[first[1L]:length(idx)]
  n <- length(idx)
  drop <- 1L                                  # the handler itself
  if (n >= 2L) {
    fn <- calls[[idx[n - 1L]]][[1L]]
    if (is.symbol(fn) && identical(as.character(fn), ".handleSimpleError")) drop <- 2L
  }
  idx <- if (n > drop) idx[seq_len(n - drop)] else integer(0)
  if (length(idx) > keep_max) {
    half <- keep_max %/% 2L
    n <- length(idx)
    return(c(vapply(calls[idx[seq_len(half)]], wb_deparse_call, ""),
             sprintf("... %d frames omitted ...", n - 2L * half),
             vapply(calls[idx[(n - half + 1L):n]], wb_deparse_call, "")))
  }
  vapply(calls[idx], wb_deparse_call, "")
}

# The row indices of each group of df by the columns `keys`, in order of first
# appearance.  Keys are exact: each column becomes integer codes of its own
# values (match() on the unclassed values: NA a value of its own, NaN another,
# -0 equal to 0, as in Spark's groupBy), never formatted text.
.wb$wb_split_groups <- function(df, keys) {
  missing <- setdiff(keys, names(df))
  if (length(missing))
    stop(sprintf("group_by column(s) %s are not in the input", paste(missing, collapse = ", ")),
         call. = FALSE)
  n <- .row_names_info(df, 2L)
  if (n == 0L) return(list())
  grp <- NULL
  for (k in keys) {
    codes <- wb_key_codes(df[[k]])
    if (is.null(grp)) {
      grp <- codes
      next
    }
    m <- max(codes)
    if (as.double(max(grp)) * m > 9007199254740992)
      stop("too many distinct group keys to combine exactly", call. = FALSE)
    pair <- (as.double(grp) - 1) * m + codes
    grp <- match(pair, unique(pair))
  }
  ngrp <- max(grp)
  unname(split.default(seq_len(n), structure(grp, levels = as.character(seq_len(ngrp)),
                                             class = "factor")))
}

# A key column as integer codes 1..m in order of first appearance.  A binary
# (list) column is coded by the bytes' hex text, NULL apart from raw(0).
.wb$wb_key_codes <- function(x) {
  if (is.list(x))
    x <- vapply(x, function(v) if (is.null(v)) NA_character_
                               else paste0("x", paste(as.character(v), collapse = "")), "")
  x <- unclass(x)
  attributes(x) <- NULL
  match(x, unique(x))
}

# A group's result with the group columns it lacks put in front.
.wb$wb_with_keys <- function(res, df, rows, keys)
  wb_keys_in_front(res, df, rep.int(rows[1L], .row_names_info(res, 2L)), keys)

# res with the columns `keys` it lacks put in front: for its row i, row at[i]
# of df.
.wb$wb_keys_in_front <- function(res, df, at, keys) {
  missing <- setdiff(keys, names(res))
  if (!length(missing)) return(res)
  front <- lapply(missing, function(k) df[[k]][at])
  structure(c(front, unclass(res)), names = c(missing, names(res)), class = "data.frame",
            row.names = .set_row_names(length(at)))
}

# Row-bind the groups' results (same column names in the same order).  Per
# column: a part that is all NA of no class (logical NA) takes the class of the
# others; factors become character; parts of different classes (Date and
# character, say) are an error naming the column, never a silent conversion.
.wb$wb_rbind <- function(frames) {
  if (length(frames) == 1L) return(frames[[1L]])
  nm <- names(frames[[1L]])
  for (x in frames[-1L])
    if (!identical(names(x), nm))
      stop(sprintf("the groups' results do not share one set of columns: (%s) vs (%s)",
                   paste(nm, collapse = ", "), paste(names(x), collapse = ", ")), call. = FALSE)
  cols <- lapply(seq_along(nm), function(j) wb_bind_column(lapply(frames, function(x) x[[j]]), nm[j]))
  structure(cols, names = nm, class = "data.frame",
            row.names = .set_row_names(sum(vapply(frames, function(x) .row_names_info(x, 2L), 1L))))
}

.wb$wb_bind_column <- function(parts, name) {
  parts <- lapply(parts, function(p) if (is.factor(p)) as.character(p) else p)
  bare_na <- vapply(parts, function(p) is.logical(p) && is.null(attributes(p)) && all(is.na(p)), NA)
  if (any(bare_na) && !all(bare_na)) {
    like <- parts[[which(!bare_na)[1L]]]
    parts[bare_na] <- lapply(parts[bare_na], function(p) like[rep(NA_integer_, length(p))])
  }
  classes <- vapply(parts, function(p) paste(class(p), collapse = "/"), "")
  plain <- classes %in% c("logical", "integer", "numeric", "character")
  if (length(unique(classes[!plain])) > 1L || (any(!plain) && any(plain)))
    stop(sprintf("column '%s': the groups' results give it different classes (%s); make them agree",
                 name, paste(unique(classes), collapse = ", ")), call. = FALSE)
  out <- do.call(c, unname(parts))
  if (inherits(parts[[1L]], "POSIXct")) attr(out, "tzone") <- attr(parts[[1L]], "tzone")
  out
}

# With options$tag_units: which partition and which group each row came from.
.wb$wb_tag <- function(res, task, opts, unit) {
  if (!isTRUE(opts$tag_units) || length(res) == 0L) return(res)
  m <- .row_names_info(res, 2L)
  p <- suppressWarnings(as.numeric(task$partition))
  if (length(p) != 1L || is.na(p)) p <- 0
  res[["__wb_partition"]] <- rep(p, m)
  res[["__wb_unit"]] <- rep(as.numeric(unit), m)
  res
}

# Turn a closure's result into a data.frame.
.wb$wb_as_frame <- function(x) {
  if (is.data.frame(x)) return(x)
  if (is.null(x))
    return(structure(list(), names = character(0), class = "data.frame",
                     row.names = integer(0)))
  if (is.matrix(x)) return(as.data.frame(x, stringsAsFactors = FALSE))
  if (is.atomic(x) || is.factor(x) || inherits(x, "Date") || inherits(x, "POSIXct")) {
    return(structure(list(result = x), class = "data.frame",
                     row.names = .set_row_names(length(x))))
  }
  if (is.list(x) && is.null(oldClass(x))) {
    lens <- lengths(x)
    if (length(unique(lens)) > 1L)
      stop(sprintf("the closure returned a list whose elements have different lengths (%s)",
                   paste(unique(lens), collapse = ", ")), call. = FALSE)
    nms <- names(x)
    if (is.null(nms)) nms <- paste0("V", seq_along(x))
    nms[is.na(nms) | !nzchar(nms)] <- paste0("V", seq_along(x))[is.na(nms) | !nzchar(nms)]
    return(structure(unname(x), names = nms, class = "data.frame",
                     row.names = .set_row_names(if (length(lens)) lens[1L] else 0L)))
  }
  stop(sprintf("the closure returned an object of class '%s', which cannot be turned into a data.frame",
               paste(class(x), collapse = "/")), call. = FALSE)
}

# A closure the R package serialized (CLOSURE frame of a TASK with options
# closure_format "serialized"; read only after the handshake): list(kind, f,
# context, globals), globals being the environment of the captured variables
# and helpers (parent: the global environment).  Returns f with its context as
# attribute "wb_context" (a list of one value, kept with f in the warm cache).
.wb$wb_unserialize_closure <- function(raw, env) {
  obj <- unserialize(raw)
  if (!is.list(obj) || !identical(obj$kind, "workerbridge R closure") || !is.function(obj$f))
    stop("the CLOSURE frame does not hold a closure serialized by the workerbridge R package",
         call. = FALSE)
  if (is.environment(obj$globals))
    assign("worker_log", get("worker_log", envir = env), envir = obj$globals)
  f <- obj$f
  attr(f, "wb_context") <- list(obj$context)
  f
}

# Run `expr` with the byte-code JIT off: the codec's functions then run
# interpreted, which for one task costs less than compiling them (~0.5 s).
# The user's closure still runs under the session's JIT setting
# (wb_with_closure_jit; wb_child_main turns the JIT off for everything else).
.wb$wb_nojit <- function(expr) {
  old <- compiler::enableJIT(0L)
  on.exit(compiler::enableJIT(old))
  expr
}
.wb$wb_closure_jit <- 3L
.wb$wb_with_closure_jit <- function(expr) {
  old <- compiler::enableJIT(wb_closure_jit)
  on.exit(compiler::enableJIT(old))
  expr
}

# profile=True: the task's phases in seconds (transfer, decode, closure,
# encode, send) and an Rprof sampling profile of the whole task, sent as one
# "profile {json}" line before "finished" (format: workerbridge/phases.py).
# When off, every verb is a no-op and the writer is passed through.
.wb$wb_profiler <- function(on) {
  st <- new.env(parent = emptyenv())
  st$phases <- list(transfer = 0, decode = 0, closure = 0, encode = 0, send = 0)
  st$transfer <- 0                       # added to by arrow_read_stream(timing = st)
  now <- function() as.numeric(Sys.time())
  add <- function(name, secs) if (on) st$phases[[name]] <- st$phases[[name]] + secs
  file <- if (on) tempfile("wb-rprof-") else ""   # in R's private session directory
  if (on) utils::Rprof(file, interval = 0.005)
  stop_rprof <- function() if (on && nzchar(file)) { utils::Rprof(NULL); unlink(file); file <<- "" }
  line <- function() {
    utils::Rprof(NULL)
    top <- tryCatch(utils::summaryRprof(file)$by.self, error = function(e) NULL)
    stop_rprof()
    fns <- list()
    if (!is.null(top) && nrow(top)) {
      top <- top[seq_len(min(nrow(top), 25L)), , drop = FALSE]
      fns <- lapply(seq_len(nrow(top)), function(i)
        list(gsub("\"", "", rownames(top)[i], fixed = TRUE), top$self.time[i], top$total.time[i]))
    }
    st$phases$transfer <- st$transfer
    paste0("profile ", wb_json_encode(list(profiler = "Rprof", phases = lapply(st$phases, round, 6L),
                                           functions = fns)))
  }
  list(on = on, now = now, add = add, timing = if (on) st else NULL,
       send_time = function() st$phases$send,
       writer = function(write) if (!on) write else function(bytes) {
         t0 <- now(); write(bytes); add("send", now() - t0)
       },
       line = line, stop = stop_rprof)
}

# One task: TASK payload already read.  Frames are written to out$write (a
# buffer; the caller flushes it after the task).  Errors raised here are
# protocol/I-O failures (fatal); errors of the closure, packages and codec are
# reported with ERROR and return normally.  logs: a wb_log_channel (or a plain
# function(message, level, role) writing LOG frames).
# Steps: settings (wb_task_setup) -> load the closure (wb_load_closure) ->
# INPUT -> run the partition (wb_run_partition) or its batches
# (wb_run_batches), each of which calls the closure and reports done.
.wb$wb_run_task <- function(con, out, task, logs, cache = new.env(parent = emptyenv())) {
  if (is.function(logs)) logs <- list(log = logs, hold = function() NULL, release = function() NULL)
  tk <- wb_task_setup(task, logs, out)
  on.exit(tk$prof$stop())
  src_raw <- wb_expect(con, "CLOSURE")
  f <- wb_load_closure(src_raw, tk, cache)
  # the input is always read to its end, so that the socket stays in step
  wb_expect(con, "INPUT")
  if (!is.function(f)) {               # the ERROR payload of a failed load
    wb_nojit(arrow_skip_stream(con))
    return(wb_task_failed(tk, f))
  }
  base <- sys.nframe()                 # the closure's traceback starts below this frame
  if (tk$batch_mode) wb_run_batches(con, tk, f, base) else wb_run_partition(con, tk, f, base)
}

# What the steps of a task share: its settings from TASK (defaults for what is
# missing), the logs, the ERROR sender, and the profiler (started last).
.wb$wb_task_setup <- function(task, logs, out) {
  opts <- task$options
  if (!is.list(opts)) opts <- list()
  log_msg <- logs$log
  group_by <- as.character(unlist(opts$group_by, use.names = FALSE))
  list(task = task, opts = opts, out = out, logs = logs, log = log_msg,
       int64 = if (identical(opts$int64, "character")) "character" else "double",
       factors = isTRUE(opts$factors),
       # rows per output batch: by default a result is one batch (split only past
       # 2 GiB of strings), as cutting it into batches copies every column
       # (2.5M rows: encode 0.60 -> 0.24 s, bench/worker_loop.py)
       batch_rows = if (is.numeric(opts$batch_rows) && length(opts$batch_rows) == 1L &&
                        opts$batch_rows >= 1) as.integer(min(opts$batch_rows, 2147483647))
                    else 2147483647L,
       context = task$context,
       packages = unique(as.character(unlist(c(task$packages, opts$packages), use.names = FALSE))),
       group_by = group_by,
       # the output schema's int64 columns: one the closure leaves as read goes back as int64
       int64_out = as.character(unlist(task$int64_out, use.names = FALSE)),
       index_param = if (is.character(opts$partition_index_param) &&
                         length(opts$partition_index_param) == 1L) opts$partition_index_param else NULL,
       hash = if (is.character(task$closure_hash) && length(task$closure_hash) == 1L) task$closure_hash else NULL,
       serialized = identical(opts$closure_format, "serialized"),
       batch_mode = identical(opts$batch_mode, "batch") && !length(group_by),
       # closure logs are buffered too, and flushed when the last flush is more
       # than a second old (so that a long closure's logs arrive while it runs)
       closure_log = function(message, level) {
         log_msg(message, level = level, role = "RClosure")
         if (out$since_flush() > 1) out$flush()
       },
       prof = wb_profiler(isTRUE(opts$profile)))
}

.wb$wb_task_failed <- function(tk, payload) {
  wb_send_json(tk$out$write, "ERROR", payload)
  invisible(FALSE)
}

.wb$wb_task_done <- function(tk, rows_in, rows_out) {
  if (tk$prof$on) tk$log(tk$prof$line())
  tk$log(wb_lifecycle("finished"))
  wb_send_json(tk$out$write, "DONE", list(rows_in = rows_in, rows_out = rows_out))
  invisible(TRUE)
}

# The task's function, or the ERROR payload that stops the task: shipped
# packages (TASK r_lib) in front of .libPaths(), those the node lacks; the
# packages; then the closure (its source may use package functions), from the
# warm cache when the CLOSURE frame is empty, else evaluated and cached.
.wb$wb_load_closure <- function(src_raw, tk, cache) {
  src <- if (tk$serialized) "" else rawToChar(src_raw)
  Encoding(src) <- "UTF-8"
  failure <- wb_use_shipped(tk$task, tk$log)
  if (is.null(failure)) failure <- wb_load_packages(tk$packages)
  if (!is.null(failure)) return(failure)
  if (length(src_raw) == 0L) return(wb_cached_closure(cache, tk$hash))
  env <- wb_closure_env(tk$closure_log)
  f <- wb_eval_closure(src_raw, src, tk$serialized, env)
  if (is.function(f) && !is.null(tk$hash)) {
    if (length(ls(cache, all.names = TRUE)) >= 16L) rm(list = ls(cache, all.names = TRUE), envir = cache)
    assign(tk$hash, f, envir = cache)
  }
  f
}

# NULL once every package is attached, else the ERROR payload of the first
# that cannot be.
.wb$wb_load_packages <- function(packages) {
  for (p in as.character(packages)) {
    ok <- tryCatch({
      suppressPackageStartupMessages(library(p, character.only = TRUE))
      TRUE
    }, error = function(e) e)
    if (!isTRUE(ok)) {
      failure <- wb_error_payload("package", ok)
      failure$message <- sprintf("cannot load R package '%s' on this node (its library paths, .libPaths(): %s): %s", p,
                                 paste(.libPaths(), collapse = ", "), conditionMessage(ok))
      failure$package <- p
      return(failure)
    }
  }
  NULL
}

# a warm child that has this closure already gets an empty CLOSURE frame
.wb$wb_cached_closure <- function(cache, hash) {
  f <- if (!is.null(hash)) cache[[hash]] else NULL
  if (is.null(f))
    return(list(kind = "closure", type = "missingClosure",
                message = "empty CLOSURE frame, and no closure with this hash was received before",
                call = NULL, traceback = I(character(0))))
  f
}

# The environment the closure's source is evaluated in (parent: the global
# environment), holding worker_log(...) for the closure's own log lines.
.wb$wb_closure_env <- function(closure_log) {
  env <- new.env(parent = globalenv())
  assign("worker_log", function(...) {
    closure_log(paste0(...), "INFO")
    invisible(NULL)
  }, envir = env)
  env
}

# The function the CLOSURE frame holds (R source evaluated in env, or the R
# package's serialized closure), or the ERROR payload saying why there is none.
.wb$wb_eval_closure <- function(src_raw, src, serialized, env) {
  failure <- NULL
  f <- tryCatch({
    if (serialized) wb_unserialize_closure(src_raw, env)
    else {
      exprs <- parse(text = src, keep.source = FALSE, encoding = "UTF-8")
      val <- NULL
      for (ex in exprs) val <- eval(ex, env)
      val
    }
  }, error = function(e) {
    p <- wb_error_payload("closure", e)
    p$message <- paste0(if (serialized) "could not load the serialized closure: "
                        else "could not evaluate the closure source: ", conditionMessage(e))
    cl <- conditionCall(e)
    if (is.call(cl) && identical(cl[[1L]], quote(parse))) p["call"] <- list(NULL)   # our own call
    failure <<- p
    NULL
  })
  if (!is.null(failure)) return(failure)
  if (!is.function(f))
    return(list(kind = "closure", type = "notAFunction",
                message = sprintf("the closure source evaluates to an object of class '%s', not a function",
                                  paste(class(f), collapse = "/")),
                call = NULL, traceback = I(character(0))))
  f
}

# How the closure is called: f(df), or f(df, context) when it takes two or
# more arguments or `...`; the partition index as `index_param` and the barrier
# infos as `barrier` when f has parameters of those names.  Returns
# list(f, context, extra, call): `call` is evaluated where f, df, context and
# extra are bound to those (wb_run_units, wb_batch_step).
.wb$wb_closure_call <- function(f, tk) {
  context <- tk$context
  if (!is.null(attr(f, "wb_context", exact = TRUE))) context <- attr(f, "wb_context", exact = TRUE)[[1L]]
  fmls <- formals(f)
  if (is.null(fmls) && is.primitive(f)) fmls <- formals(args(f))
  fnames <- names(fmls)
  extra <- list()
  if (!is.null(tk$index_param) && (tk$index_param %in% fnames))
    extra[[tk$index_param]] <- tk$task$partition
  if (!is.null(tk$task$barrier) && "barrier" %in% fnames) extra$barrier <- tk$task$barrier
  positional <- setdiff(fnames, names(extra))
  two <- length(positional) >= 2L || "..." %in% fnames
  call <- as.call(c(list(quote(f), quote(df)), if (two) list(quote(context)),
                    lapply(names(extra), function(nm) call("[[", quote(extra), nm))))
  if (length(extra)) names(call) <- c("", "", if (two) "", names(extra))
  list(f = f, context = context, extra = extra, call = call)
}

# The handlers around the closure's call: its warnings become WARN lines; on
# an error keep only the calls (cheap: errors the closure catches itself pass
# through this handler too), deparsed by failure(e) once the error escapes.
.wb$wb_closure_guard <- function(closure_log, base) {
  st <- new.env(parent = emptyenv())
  st$calls <- NULL
  list(warning = function(w) {
         closure_log(conditionMessage(w), "WARN")
         invokeRestart("muffleWarning")
       },
       error = function(e) st$calls <- sys.calls(),
       failure = function(e)
         wb_error_payload("closure", e, traceback = wb_traceback(st$calls, base)))
}

# The INPUT stream, decoded with the JIT off (its batches handed to on_batch,
# when given); decoding warnings (int64 beyond 2^53) become WARN lines in the
# driver's log.  Returns what arrow_read_stream returns, or the condition
# (arrow_codec_error, or wb_batch_failed from on_batch) that ended it.
.wb$wb_read_input <- function(con, tk, on_batch = NULL, keep = NULL) {
  decode_warning <- function(w) {
    tk$log(conditionMessage(w), level = "WARN")
    invokeRestart("muffleWarning")
  }
  tryCatch(withCallingHandlers(
             wb_nojit(arrow_read_stream(con, int64 = tk$int64, factors = tk$factors,
                                        on_batch = on_batch, timing = tk$prof$timing,
                                        keep = keep)),
             warning = decode_warning),
           wb_batch_failed = function(e) e,
           arrow_codec_error = function(e) e)
}

.wb$wb_codec_failure <- function(e) {
  p <- wb_error_payload("codec", e, column = e$column)
  p$message <- paste0("could not decode the input: ", conditionMessage(e))
  p
}

.wb$wb_result_failure <- function(e) {
  kind <- if (inherits(e, "arrow_codec_error")) "codec" else "result"
  p <- wb_error_payload(kind, e, column = e$column)
  p$message <- paste0("could not encode the result: ", conditionMessage(e))
  p
}

.wb$wb_mark_int64 <- function(res, opts) {
  if (isTRUE(opts$tag_units))
    for (k in intersect(c("__wb_partition", "__wb_unit"), names(res)))
      class(res[[k]]) <- "wb_int64"      # written as int64
  res
}

# ---- partition mode: the whole input as one data.frame, the closure on it
# (or on each group of it), the results as one output stream.
.wb$wb_run_partition <- function(con, tk, f, base) {
  prof <- tk$prof
  out <- tk$out
  t_read <- prof$now()
  # the input's columns: one the closure leaves as it is goes back named, not
  # written (the Worker puts back what it sent; int64: when the output schema
  # has an int64 column of its name, TASK int64_out)
  kept <- new.env(parent = emptyenv())
  df <- wb_read_input(con, tk, keep = kept)
  if (inherits(df, "arrow_codec_error")) return(wb_task_failed(tk, wb_codec_failure(df)))
  if (prof$on) prof$add("decode", prof$now() - t_read - prof$timing$transfer)
  rows_in <- .row_names_info(df, 2L)
  tk$log(wb_lifecycle("retrieved", rows = rows_in))
  tk$log(wb_lifecycle("columns", columns = length(df)))
  # A large input means a closure that likely runs long: let the logs out now.
  # (Small tasks keep everything in one write at the end: no Nagle stall.)
  if (rows_in * max(1L, length(df)) >= 100000) out$flush()

  cl <- wb_closure_call(f, tk)
  units <- if (length(tk$group_by)) wb_split_groups(df, tk$group_by) else list(NULL)
  guard <- wb_closure_guard(tk$closure_log, base)
  t0 <- prof$now()
  result <- tryCatch(
    withCallingHandlers(wb_run_units(cl, df, units), warning = guard$warning, error = guard$error),
    error = function(e) e)
  prof$add("closure", prof$now() - t0)
  if (inherits(result, "error")) return(wb_task_failed(tk, guard$failure(result)))
  tk$log(wb_lifecycle("applied", rows = rows_in,
                      detail = if (length(tk$group_by)) sprintf(" in %d groups", length(units)) else ""))

  t0 <- prof$now()
  prep <- wb_prepare_result(result, df, units, tk, kept$cols)
  kept$cols <- NULL                      # prep holds the ones it uses
  if (inherits(prep, "error")) return(wb_task_failed(tk, wb_result_failure(prep)))
  rows_out <- prep$nrow
  tk$log(wb_lifecycle("returned", rows = rows_out))
  # OUTPUT's payload: {"input_columns": {output position: input position}}
  wb_send_frame(out$write, "OUTPUT",
                if (length(prep$refs)) wb_json_encode(list(input_columns = prep$refs)) else raw())
  wb_nojit(arrow_write_stream(prep, prof$writer(wb_piece_writer(out)), batch_rows = tk$batch_rows,
                              vectors = TRUE))
  prof$add("encode", prof$now() - t0 - prof$send_time())
  wb_task_done(tk, rows_in, rows_out)
}

# Evaluates the closure's call with `df` bound to the partition (`whole`), or
# to each group of it (units: each group's rows, or list(NULL) for the whole).
.wb$wb_run_units <- function(cl, whole, units) {
  f <- cl$f
  context <- cl$context
  extra <- cl$extra
  res <- vector("list", length(units))
  for (u in seq_along(units)) {
    rows <- units[[u]]
    df <- if (is.null(rows)) whole
          else structure(lapply(whole, function(x) x[rows]), names = names(whole),
                         class = "data.frame", row.names = .set_row_names(length(rows)))
    res[u] <- list(wb_with_closure_jit(eval(cl$call)))
  }
  res
}

# The writer of the output stream's pieces: raw vectors through the write
# buffer, columns ("ai_vec" pieces of the codec) straight to the socket.
.wb$wb_piece_writer <- function(out)
  function(p) if (inherits(p, "ai_vec")) out$write_vector(p$x, p$size) else out$write(p)

# The closure's results as one prepared frame (with groups, wb_bind_groups),
# or the error.
.wb$wb_prepare_result <- function(result, df, units, tk, known = NULL) {
  tryCatch({
    frames <- lapply(result, wb_as_frame)
    res <- if (length(tk$group_by)) wb_bind_groups(frames, df, units, tk$group_by, tk$task, tk$opts)
           else wb_tag(frames[[1L]], tk$task, tk$opts, 0L)
    wb_nojit(arrow_prepare_frame(wb_mark_int64(res, tk$opts), known, tk$int64_out))
  }, error = function(e) e)
}

# The groups' results as one frame: each given the key columns it lacks (from
# its group's first row), empty ones dropped, tagged, row-bound.  When the
# frames share their columns and no tags are wanted (the usual case), the key
# columns are made once, after the bind, not group by group (5,000 groups:
# about a tenth of the task); the values are the same either way.
.wb$wb_bind_groups <- function(frames, df, units, keys, task, opts) {
  empty <- structure(list(), names = character(0), class = "data.frame", row.names = integer(0))
  nm <- if (length(frames)) names(frames[[1L]])
  alike <- length(frames) && !isTRUE(opts$tag_units) &&
    all(vapply(frames, function(x) identical(names(x), nm), NA))
  if (alike) {
    m <- vapply(frames, function(x) .row_names_info(x, 2L), 1L)
    keep <- m > 0L
    if (!any(keep)) return(empty)
    at <- rep.int(vapply(units[keep], function(rows) rows[1L], 1), m[keep])
    res <- wb_keys_in_front(wb_rbind(frames[keep]), df, at, keys)
    # each key column bound as wb_rbind binds it when the keys go in per group
    for (k in setdiff(keys, nm)) res[[k]] <- wb_bind_column(list(res[[k]]), k)
    return(res)
  }
  frames <- lapply(seq_along(frames), function(u) wb_with_keys(frames[[u]], df, units[[u]], keys))
  frames <- frames[vapply(frames, function(x) .row_names_info(x, 2L) > 0L, NA)]
  frames <- lapply(seq_along(frames), function(u) wb_tag(frames[[u]], task, opts, u - 1L))
  if (length(frames)) wb_rbind(frames) else empty
}

# ---- batch mode: the closure per Arrow record batch, each result streamed
# back at once; memory bounded by a batch.  Log lines wait while the output
# stream is open (they would land inside it).
.wb$wb_run_batches <- function(con, tk, f, base) {
  prof <- tk$prof
  t_read <- prof$now()
  st <- new.env(parent = emptyenv())
  st$rows_in <- 0
  st$rows_out <- 0
  st$batches <- 0L
  st$failure <- NULL
  st$output <- FALSE          # OUTPUT frame sent (with the stream's first bytes)
  st$first_empty <- NULL      # an empty first result, written only if nothing else is
  cl <- wb_closure_call(f, tk)
  guard <- wb_closure_guard(tk$closure_log, base)
  writer <- wb_output_writer(tk, st)
  on_batch <- wb_batch_step(cl, tk, st, writer, guard)
  tk$logs$hold()
  got <- wb_read_input(con, tk, on_batch)
  if (inherits(got, "arrow_codec_error")) st$failure <- wb_codec_failure(got)
  if (prof$on)                   # what the reading took besides the batches' own work
    prof$add("decode", prof$now() - t_read - prof$timing$transfer - sum(unlist(prof$timing$phases)))
  if (st$output) writer$close()              # end the stream before anything else
  tk$logs$release()
  if (!is.null(st$failure)) return(wb_task_failed(tk, st$failure))
  if (!st$output) {
    # no row came back: the first (empty) result, or no columns at all
    writer$write(if (!is.null(st$first_empty)) st$first_empty
                 else structure(list(), names = character(0), class = "data.frame",
                                row.names = integer(0)))
    writer$close()
  }
  tk$log(wb_lifecycle("retrieved", rows = st$rows_in))
  tk$log(wb_lifecycle("columns", columns = length(got$names)))
  tk$log(wb_lifecycle("applied", rows = st$rows_in, detail = sprintf(" in %d batches", st$batches)))
  tk$log(wb_lifecycle("returned", rows = st$rows_out))
  wb_task_done(tk, st$rows_in, st$rows_out)
}

# Batch mode's output stream: an OUTPUT frame goes with its first bytes
# (st$output), all of it through the profiler's send timing.
.wb$wb_output_writer <- function(tk, st) {
  send <- tk$prof$writer(wb_piece_writer(tk$out))
  arrow_stream_writer(function(bytes) {
    if (!st$output) {
      wb_send_frame(send, "OUTPUT")
      st$output <- TRUE
    }
    send(bytes)
  }, batch_rows = tk$batch_rows, vectors = TRUE)
}

# Batch mode's on_batch(df): the closure on one input batch (under the
# session's JIT), its result prepared and written.  A failure is kept in
# st$failure and ends the reading with a wb_batch_failed condition.
.wb$wb_batch_step <- function(cl, tk, st, writer, guard) {
  f <- cl$f
  context <- cl$context
  extra <- cl$extra
  call <- cl$call
  prof <- tk$prof
  out <- tk$out
  task <- tk$task
  opts <- tk$opts
  jit <- wb_closure_jit
  stop_batches <- structure(class = c("wb_batch_failed", "error", "condition"),
                            list(message = "batch failed", call = NULL))
  fail <- function(payload) {
    st$failure <- payload
    stop(stop_batches)
  }
  function(df) {
    st$batches <- st$batches + 1L
    st$rows_in <- st$rows_in + .row_names_info(df, 2L)
    old <- compiler::enableJIT(jit)        # the closure runs under the session's JIT
    t0 <- prof$now()
    res <- tryCatch(withCallingHandlers(eval(call), warning = guard$warning, error = guard$error),
                    error = function(e) e)
    prof$add("closure", prof$now() - t0)
    compiler::enableJIT(old)
    df <- NULL
    if (inherits(res, "error")) fail(guard$failure(res))
    prep <- tryCatch(arrow_prepare_frame(wb_mark_int64(wb_tag(wb_as_frame(res), task, opts, 0L), opts)),
                     error = function(e) e)
    res <- NULL
    if (inherits(prep, "error")) fail(wb_result_failure(prep))
    if (prep$nrow == 0L) {
      if (is.null(st$first_empty) && !writer$started()) st$first_empty <- prep
      return(invisible(NULL))
    }
    t0 <- prof$now()
    sent <- prof$send_time()
    err <- tryCatch({ writer$write(prep); NULL }, arrow_codec_error = function(e) e)
    prof$add("encode", prof$now() - t0 - (prof$send_time() - sent))
    if (!is.null(err)) fail(wb_result_failure(err))
    st$rows_out <- st$rows_out + prep$nrow
    # results leave in writes of ~256 KB (or once a second): a bounded
    # buffer, without a send per small batch
    if (out$pending() >= 262144 || out$since_flush() > 1) out$flush()
    invisible(NULL)
  }
}

# Give the child's functions the child environment as their home: each one
# defined above (as .wb$name at top level, so in globalenv until now).
local({
  for (nm in ls(.wb, all.names = TRUE))
    if (is.function(.wb[[nm]]) && identical(environment(.wb[[nm]]), globalenv()))
      environment(.wb[[nm]]) <- .wb
})

if (!interactive()) .wb$wb_child_main()
