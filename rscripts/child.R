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
# TASK fields used: partition, closure_hash (an empty CLOSURE frame reuses the
# closure received earlier under that hash), context, barrier, packages (top
# level or in options), options: int64 ("double"|"character"), factors,
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
  cache <- new.env(parent = emptyenv())     # closure_hash -> function (warm reuse)
  # WORKERBRIDGE_RPROF=<file>: an Rprof sampling profile of every task (bench/)
  prof <- Sys.getenv("WORKERBRIDGE_RPROF", "")
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
      if (nzchar(prof)) utils::Rprof(prof, interval = 0.002, append = TRUE)
      wb_run_task(con, out, wb_decode_json_payload(fr$payload), logs, cache)
      if (nzchar(prof)) utils::Rprof(NULL)
      out$flush()
      dirty <- TRUE
    }, error = function(e) {
      try(out$flush(), silent = TRUE)
      die(sprintf("task failed: %s", conditionMessage(e)))
    })
  }
  try(close(con), silent = TRUE)
  quit(save = "no", status = 0L)
}

# LOG frames, which can be held back: while an Arrow stream is being written
# (batch mode, where the closure runs between its batches) log lines wait and
# follow the stream.  Returns list(log(message, level, role), hold(), release()).
.wb$wb_log_channel <- function(write) {
  st <- new.env(parent = emptyenv())
  st$held <- NULL
  send <- function(rec) wb_send_json(write, "LOG", rec)
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
# tryCatch internals, withCallingHandlers, f(df) ... the user's frames ...,
# [.handleSimpleError], the handler.  Long tracebacks keep their ends.
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
# appearance; NA is a key value of its own.
.wb$wb_split_groups <- function(df, keys) {
  missing <- setdiff(keys, names(df))
  if (length(missing))
    stop(sprintf("group_by column(s) %s are not in the input", paste(missing, collapse = ", ")),
         call. = FALSE)
  n <- .row_names_info(df, 2L)
  if (n == 0L) return(list())
  parts <- lapply(keys, function(k) {
    x <- df[[k]]
    if (is.list(x)) x <- vapply(x, function(v) paste(as.character(v), collapse = ","), "")
    s <- as.character(x)
    s[is.na(x)] <- "\001NA"
    s
  })
  key <- if (length(parts) == 1L) parts[[1L]] else do.call(paste, c(parts, sep = "\002"))
  grp <- match(key, key)
  ord <- unique(grp)
  unname(split(seq_len(n), factor(grp, levels = ord)))
}

# A group's result with the group columns it lacks put in front.
.wb$wb_with_keys <- function(res, df, rows, keys) {
  missing <- setdiff(keys, names(res))
  if (!length(missing)) return(res)
  m <- .row_names_info(res, 2L)
  front <- lapply(missing, function(k) {
    x <- df[[k]]
    x[rep.int(rows[1L], m)]
  })
  names(front) <- missing
  structure(c(front, unclass(res)), names = c(missing, names(res)), class = "data.frame",
            row.names = .set_row_names(m))
}

# Row-bind the groups' results (same column names in the same order).
.wb$wb_rbind <- function(frames) {
  if (length(frames) == 1L) return(frames[[1L]])
  nm <- names(frames[[1L]])
  for (x in frames[-1L])
    if (!identical(names(x), nm))
      stop(sprintf("the groups' results do not share one set of columns: (%s) vs (%s)",
                   paste(nm, collapse = ", "), paste(names(x), collapse = ", ")), call. = FALSE)
  cols <- lapply(seq_along(nm), function(j) {
    parts <- lapply(frames, function(x) x[[j]])
    if (is.factor(parts[[1L]])) parts <- lapply(parts, as.character)
    do.call(c, parts)
  })
  structure(cols, names = nm, class = "data.frame",
            row.names = .set_row_names(sum(vapply(frames, function(x) .row_names_info(x, 2L), 1L))))
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

# Run `expr` with the byte-code JIT off: the codec's functions then run
# interpreted, which for one task costs less than compiling them (~0.5 s).
# The user's closure still runs under the session's JIT setting.
.wb$wb_nojit <- function(expr) {
  old <- compiler::enableJIT(0L)
  on.exit(compiler::enableJIT(old))
  expr
}

# One task: TASK payload already read.  Frames are written to out$write (a
# buffer; the caller flushes it after the task).  Errors raised here are
# protocol/I-O failures (fatal); errors of the closure, packages and codec are
# reported with ERROR and return normally.  logs: a wb_log_channel (or a plain
# function(message, level, role) writing LOG frames).
.wb$wb_run_task <- function(con, out, task, logs, cache = new.env(parent = emptyenv())) {
  if (is.function(logs)) logs <- list(log = logs, hold = function() NULL, release = function() NULL)
  log_msg <- logs$log
  opts <- task$options
  if (!is.list(opts)) opts <- list()
  int64 <- if (identical(opts$int64, "character")) "character" else "double"
  factors <- isTRUE(opts$factors)
  batch_rows <- if (is.numeric(opts$batch_rows) && length(opts$batch_rows) == 1L &&
                    opts$batch_rows >= 1) as.integer(opts$batch_rows) else 1048576L
  context <- task$context
  packages <- unique(as.character(unlist(c(task$packages, opts$packages), use.names = FALSE)))
  group_by <- as.character(unlist(opts$group_by, use.names = FALSE))
  index_param <- if (is.character(opts$partition_index_param) &&
                     length(opts$partition_index_param) == 1L) opts$partition_index_param else NULL
  hash <- if (is.character(task$closure_hash) && length(task$closure_hash) == 1L) task$closure_hash else NULL

  src_raw <- wb_expect(con, "CLOSURE")
  src <- rawToChar(src_raw)
  Encoding(src) <- "UTF-8"

  send_error <- function(payload) wb_send_json(out$write, "ERROR", payload)
  failure <- NULL          # an ERROR payload to send once the input has been read

  # packages, then the closure (its source may use package functions)
  for (p in as.character(packages)) {
    if (!is.null(failure)) break
    ok <- tryCatch({
      suppressPackageStartupMessages(library(p, character.only = TRUE))
      TRUE
    }, error = function(e) e)
    if (!isTRUE(ok)) {
      failure <- wb_error_payload("package", ok)
      failure$message <- sprintf("cannot load R package '%s' on this node (its library paths, .libPaths(): %s): %s", p,
                                 paste(.libPaths(), collapse = ", "), conditionMessage(ok))
      failure$package <- p
    }
  }

  f <- NULL
  env <- new.env(parent = globalenv())
  # closure logs are buffered too, and flushed when the last flush is more
  # than a second old (so that a long closure's logs arrive while it runs)
  closure_log <- function(message, level) {
    log_msg(message, level = level, role = "RClosure")
    if (out$since_flush() > 1) out$flush()
  }
  assign("worker_log", function(...) {
    closure_log(paste0(...), "INFO")
    invisible(NULL)
  }, envir = env)
  if (is.null(failure) && length(src_raw) == 0L) {
    # a warm child that has this closure already gets an empty CLOSURE frame
    f <- if (!is.null(hash)) cache[[hash]] else NULL
    if (is.null(f))
      failure <- list(kind = "closure", type = "missingClosure",
                      message = "empty CLOSURE frame, and no closure with this hash was received before",
                      call = NULL, traceback = I(character(0)))
  } else if (is.null(failure)) {
    f <- tryCatch({
      exprs <- parse(text = src, keep.source = FALSE, encoding = "UTF-8")
      val <- NULL
      for (ex in exprs) val <- eval(ex, env)
      val
    }, error = function(e) {
      p <- wb_error_payload("closure", e)
      p$message <- paste0("could not evaluate the closure source: ", conditionMessage(e))
      cl <- conditionCall(e)
      if (is.call(cl) && identical(cl[[1L]], quote(parse))) p["call"] <- list(NULL)   # our own call
      failure <<- p
      NULL
    })
    if (is.null(failure) && !is.function(f)) {
      failure <- list(kind = "closure", type = "notAFunction",
                      message = sprintf("the closure source evaluates to an object of class '%s', not a function",
                                        paste(class(f), collapse = "/")),
                      call = NULL, traceback = I(character(0)))
    }
    if (is.null(failure) && !is.null(hash)) {
      if (length(ls(cache, all.names = TRUE)) >= 16L) rm(list = ls(cache, all.names = TRUE), envir = cache)
      assign(hash, f, envir = cache)
    }
  }

  # the input is always read to its end, so that the socket stays in step
  wb_expect(con, "INPUT")
  if (!is.null(failure)) {
    wb_nojit(arrow_skip_stream(con))
    send_error(failure)
    return(invisible(FALSE))
  }
  # decoding warnings (int64 beyond 2^53) become WARN lines in the driver's log
  decode_warning <- function(w) {
    log_msg(conditionMessage(w), level = "WARN")
    invokeRestart("muffleWarning")
  }
  codec_failure <- function(e) {
    p <- wb_error_payload("codec", e, column = e$column)
    p$message <- paste0("could not decode the input: ", conditionMessage(e))
    p
  }
  batch_mode <- identical(opts$batch_mode, "batch") && !length(group_by)
  df <- NULL
  if (!batch_mode) {
    df <- tryCatch(withCallingHandlers(
                     wb_nojit(arrow_read_stream(con, int64 = int64, factors = factors)),
                     warning = decode_warning),
                   arrow_codec_error = function(e) e)
    if (inherits(df, "arrow_codec_error")) {
      send_error(codec_failure(df))
      return(invisible(FALSE))
    }
    rows_in <- .row_names_info(df, 2L)
    log_msg(wb_lifecycle("retrieved", rows = rows_in))
    log_msg(wb_lifecycle("columns", columns = length(df)))
    # A large input means a closure that likely runs long: let the logs out now.
    # (Small tasks keep everything in one write at the end: no Nagle stall.)
    if (rows_in * max(1L, length(df)) >= 100000) out$flush()
  }

  # call the closure: f(df), or f(df, context) when it takes two or more
  # arguments or `...`; the partition index as `index_param` and the barrier
  # infos as `barrier` when f has parameters of those names
  fmls <- formals(f)
  if (is.null(fmls) && is.primitive(f)) fmls <- formals(args(f))
  fnames <- names(fmls)
  extra <- list()
  if (!is.null(index_param) && (index_param %in% fnames))
    extra[[index_param]] <- task$partition
  if (!is.null(task$barrier) && "barrier" %in% fnames) extra$barrier <- task$barrier
  positional <- setdiff(fnames, names(extra))
  two <- length(positional) >= 2L || "..." %in% fnames
  call <- as.call(c(list(quote(f), quote(df)), if (two) list(quote(context)),
                    lapply(names(extra), function(nm) call("[[", quote(extra), nm))))
  if (length(extra)) names(call) <- c("", "", if (two) "", names(extra))
  tb_calls <- NULL
  base <- sys.nframe()
  # the closure's warnings become WARN lines; on an error keep only the calls
  # (cheap: errors the closure catches itself pass through this handler too)
  # and deparse them once the error escapes
  closure_warning <- function(w) {
    closure_log(conditionMessage(w), "WARN")
    invokeRestart("muffleWarning")
  }
  closure_error <- function(e) tb_calls <<- sys.calls()
  closure_failure <- function(e)
    wb_error_payload("closure", e, traceback = wb_traceback(tb_calls, base))
  result_failure <- function(e) {
    kind <- if (inherits(e, "arrow_codec_error")) "codec" else "result"
    p <- wb_error_payload(kind, e, column = e$column)
    p$message <- paste0("could not encode the result: ", conditionMessage(e))
    p
  }
  mark_int64 <- function(res) {
    if (isTRUE(opts$tag_units))
      for (k in intersect(c("__wb_partition", "__wb_unit"), names(res)))
        class(res[[k]]) <- "wb_int64"      # written as int64
    res
  }

  if (batch_mode) {
    # ---- batch mode: the closure per Arrow record batch, each result streamed
    # back at once; memory bounded by a batch.  Log lines wait while the
    # output stream is open (they would land inside it).
    jit <- compiler::enableJIT(-1L)
    st <- new.env(parent = emptyenv())
    st$rows_in <- 0
    st$rows_out <- 0
    st$batches <- 0L
    st$failure <- NULL
    st$output <- FALSE          # OUTPUT frame sent (with the stream's first bytes)
    st$first_empty <- NULL      # an empty first result, written only if nothing else is
    stop_batches <- structure(class = c("wb_batch_failed", "error", "condition"),
                              list(message = "batch failed", call = NULL))
    writer <- arrow_stream_writer(function(bytes) {
      if (!st$output) {
        wb_send_frame(out$write, "OUTPUT")
        st$output <- TRUE
      }
      out$write(bytes)
    }, batch_rows = batch_rows)
    on_batch <- function(df) {
      st$batches <- st$batches + 1L
      st$rows_in <- st$rows_in + .row_names_info(df, 2L)
      old <- compiler::enableJIT(jit)        # the closure runs under the session's JIT
      res <- tryCatch(withCallingHandlers(eval(call), warning = closure_warning,
                                          error = closure_error),
                      error = function(e) e)
      compiler::enableJIT(old)
      df <- NULL
      if (inherits(res, "error")) {
        st$failure <- closure_failure(res)
        stop(stop_batches)
      }
      prep <- tryCatch(arrow_prepare_frame(mark_int64(wb_tag(wb_as_frame(res), task, opts, 0L))),
                       error = function(e) e)
      res <- NULL
      if (inherits(prep, "error")) {
        st$failure <- result_failure(prep)
        stop(stop_batches)
      }
      if (prep$nrow == 0L) {
        if (is.null(st$first_empty) && !writer$started()) st$first_empty <- prep
        return(invisible(NULL))
      }
      err <- tryCatch({ writer$write(prep); NULL }, arrow_codec_error = function(e) e)
      if (!is.null(err)) {
        st$failure <- result_failure(err)
        stop(stop_batches)
      }
      st$rows_out <- st$rows_out + prep$nrow
      # results leave in writes of ~256 KB (or once a second): a bounded
      # buffer, without a send per small batch
      if (out$pending() >= 262144 || out$since_flush() > 1) out$flush()
      invisible(NULL)
    }
    logs$hold()
    got <- tryCatch(withCallingHandlers(
                      wb_nojit(arrow_read_stream(con, int64 = int64, factors = factors,
                                                 on_batch = on_batch)),
                      warning = decode_warning),
                    wb_batch_failed = function(e) e,
                    arrow_codec_error = function(e) e)
    if (inherits(got, "arrow_codec_error")) st$failure <- codec_failure(got)
    if (st$output) writer$close()              # end the stream before anything else
    logs$release()
    if (!is.null(st$failure)) {
      send_error(st$failure)
      return(invisible(FALSE))
    }
    if (!st$output) {
      # no row came back: the first (empty) result, or no columns at all
      writer$write(if (!is.null(st$first_empty)) st$first_empty
                   else structure(list(), names = character(0), class = "data.frame",
                                  row.names = integer(0)))
      writer$close()
    }
    log_msg(wb_lifecycle("retrieved", rows = st$rows_in))
    log_msg(wb_lifecycle("columns", columns = length(got$names)))
    log_msg(wb_lifecycle("applied", rows = st$rows_in, detail = sprintf(" in %d batches", st$batches)))
    log_msg(wb_lifecycle("returned", rows = st$rows_out))
    log_msg(wb_lifecycle("finished"))
    wb_send_json(out$write, "DONE", list(rows_in = st$rows_in, rows_out = st$rows_out))
    return(invisible(TRUE))
  }

  units <- if (length(group_by)) wb_split_groups(df, group_by) else list(NULL)
  # evaluates `call` with `df` bound to the partition, or to each group of it
  run_units <- function(whole) {
    res <- vector("list", length(units))
    for (u in seq_along(units)) {
      rows <- units[[u]]
      df <- if (is.null(rows)) whole
            else structure(lapply(whole, function(x) x[rows]), names = names(whole),
                           class = "data.frame", row.names = .set_row_names(length(rows)))
      res[u] <- list(eval(call))
    }
    res
  }
  result <- tryCatch(
    withCallingHandlers(run_units(df), warning = closure_warning, error = closure_error),
    error = function(e) e)
  if (inherits(result, "error")) {
    send_error(closure_failure(result))
    return(invisible(FALSE))
  }
  log_msg(wb_lifecycle("applied", rows = rows_in,
                       detail = if (length(group_by)) sprintf(" in %d groups", length(units)) else ""))

  prep <- tryCatch({
    frames <- lapply(result, wb_as_frame)
    if (length(group_by)) {
      frames <- lapply(seq_along(frames), function(u) wb_with_keys(frames[[u]], df, units[[u]], group_by))
      keep <- vapply(frames, function(x) .row_names_info(x, 2L) > 0L, NA)
      units_kept <- which(keep)
      frames <- frames[keep]
      frames <- lapply(seq_along(frames), function(u) wb_tag(frames[[u]], task, opts, u - 1L))
      res <- if (length(frames)) wb_rbind(frames)
             else structure(list(), names = character(0), class = "data.frame", row.names = integer(0))
    } else {
      res <- wb_tag(frames[[1L]], task, opts, 0L)
    }
    wb_nojit(arrow_prepare_frame(mark_int64(res)))
  }, error = function(e) e)
  if (inherits(prep, "error")) {
    send_error(result_failure(prep))
    return(invisible(FALSE))
  }
  rows_out <- prep$nrow
  log_msg(wb_lifecycle("returned", rows = rows_out))
  wb_send_frame(out$write, "OUTPUT")
  wb_nojit(arrow_write_stream(prep, out$write, batch_rows = batch_rows))
  log_msg(wb_lifecycle("finished"))
  wb_send_json(out$write, "DONE", list(rows_in = rows_in, rows_out = rows_out))
  invisible(TRUE)
}

# Give the child's functions the child environment as their home.
local({
  for (nm in c("wb_child_main", "wb_log_channel", "wb_error_payload", "wb_deparse_call", "wb_as_frame", "wb_run_task",
               "wb_nojit", "wb_traceback", "wb_split_groups", "wb_with_keys", "wb_rbind", "wb_tag"))
    environment(.wb[[nm]]) <- .wb
})

if (!interactive()) .wb$wb_child_main()
