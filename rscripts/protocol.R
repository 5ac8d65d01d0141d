# Wire protocol between a Worker and its R child (RScript).
#
# Mirrors workerbridge/protocol.py, whose docstring is the specification.  The
# constant table below must hold the same names and values as protocol.py;
# tests/test_r_protocol_table.py keeps the two equal.
#
# Frames: an 8-byte header (int32 message type, big-endian; uint32 payload
# length, big-endian), then the payload.  INPUT and OUTPUT announce that a
# raw Arrow IPC stream follows on the socket; OUTPUT's payload may name the
# output columns the Worker puts back from the input ({"input_columns"}, see
# protocol.py).  JSON payloads are UTF-8.
#
# Base R only.  Public functions:
#   wb_read_exact(con, n)                     -> raw(n) or a wb_peer_closed error
#   wb_send_frame(con, type, payload = raw()) -> invisible(NULL)   (con: connection or sink function)
#   wb_buffered_writer(con, limit = 4194304)  -> list(write, write_vector, flush, pending, since_flush)
#   wb_send_json(con, type, obj)              -> invisible(NULL)
#   wb_recv_frame(con, max_bytes)             -> list(type = <int>, name = <chr>, payload = <raw>)
#   wb_expect(con, want, max_bytes)           -> payload (raw)
#   wb_decode_json_payload(payload)           -> R value
#   wb_json_encode(x)                         -> one JSON string (UTF-8)
#   wb_log_json(level, role, message)         -> a LOG record's JSON (what wb_json_encode gives)
#   wb_json_decode(txt, simplify = TRUE)      -> R value
#   wb_message_name(type)                     -> "AUTH", ... or NA

WB_PROTOCOL_VERSION <- 1L

WB_MESSAGE_TYPES <- c(
  AUTH = 1L,
  HELLO = 2L,
  WELCOME = 3L,
  TASK = 4L,
  CLOSURE = 5L,
  INPUT = 6L,
  LOG = 7L,
  ERROR = 8L,
  OUTPUT = 9L,
  DONE = 10L,
  BYE = 11L
)

# The lifecycle vocabulary: the lines a child writes about its task, with
# {field} placeholders.  workerbridge/wire/lifecycle.py holds the same templates
# (and the parsers that read them back); a test holds the two equal.
WB_LIFECYCLE <- c(
  connected = "is connected to backend",
  loaded = "loaded closure {digest} ({size} bytes)",
  retrieved = "retrieved {rows} rows",
  columns = "retrieved {columns} column names",
  applied = "applied closure to {rows} rows{detail}",
  returned = "returned {rows} rows",
  finished = "finished"
)

# The text of lifecycle line `name`; numbers are written in full (no 1e+05).
wb_lifecycle <- function(name, ...) {
  text <- WB_LIFECYCLE[[name]]
  fields <- list(...)
  for (f in names(fields)) {
    v <- fields[[f]]
    if (is.numeric(v)) v <- format(v, scientific = FALSE, trim = TRUE)
    text <- gsub(paste0("{", f, "}"), v, text, fixed = TRUE)
  }
  text
}

WB_HEADER_BYTES <- 8L
WB_MAX_AUTH_BYTES <- 1024L          # bound on any frame before the secret checks out
WB_MAX_FRAME_BYTES <- 1073741824    # bound on any frame after (1 GiB), 2^30
WB_SECRET_BYTES <- 32L              # random bytes; sent as 64 hex characters

WB_ENV_PORT <- "WORKERBRIDGE_PORT"
WB_ENV_HOST <- "WORKERBRIDGE_HOST"

# ---------------------------------------------------------------------------
# Conditions

# got: for wb_peer_closed, how many bytes of the expected item had arrived
# (0 means the peer closed the connection cleanly at a frame boundary).
wb_protocol_error <- function(msg, peer_closed = FALSE, got = NA_real_) {
  cls <- c(if (peer_closed) "wb_peer_closed", "wb_protocol_error", "error", "condition")
  structure(class = cls, list(message = msg, call = NULL, got = got))
}

wb_message_name <- function(type) {
  nm <- names(WB_MESSAGE_TYPES)[match(type, WB_MESSAGE_TYPES)]
  if (length(nm) == 0L) NA_character_ else nm
}

wb_type_code <- function(type) {
  if (is.character(type)) {
    code <- WB_MESSAGE_TYPES[type]
    if (length(type) != 1L || is.na(code))
      stop(wb_protocol_error(sprintf("unknown message type name %s", paste(type, collapse = ","))))
    return(unname(code))
  }
  type <- as.integer(type)
  if (length(type) != 1L || is.na(wb_message_name(type)))
    stop(wb_protocol_error(sprintf("unknown message type %s", paste(type, collapse = ","))))
  type
}

# ---------------------------------------------------------------------------
# Frame I/O on a blocking binary connection

# Read exactly n bytes.  readBin on a socket may return fewer bytes than asked
# for; loop until done.  A zero-length read means EOF.
wb_read_exact <- function(con, n) {
  n <- as.numeric(n)
  if (n <= 0) return(raw(0))
  first <- readBin(con, "raw", n)
  got <- as.numeric(length(first))
  if (got == n) return(first)
  chunks <- list(first)
  while (got < n) {
    chunk <- readBin(con, "raw", min(n - got, 16777216))
    k <- length(chunk)
    if (k == 0L)
      stop(wb_protocol_error(sprintf("connection closed after %.0f of %.0f bytes", got, n),
                             peer_closed = TRUE, got = got))
    chunks[[length(chunks) + 1L]] <- chunk
    got <- got + k
  }
  do.call(c, chunks)
}

wb_pack_header <- function(type, length) {
  len <- as.numeric(length)
  if (len >= 2147483648) len <- len - 4294967296  # uint32 bit pattern as int32
  writeBin(c(as.integer(type), as.integer(len)), raw(), size = 4L, endian = "big")
}

# `con` is a binary connection, or a function(bytes) that takes the bytes (for
# example a buffered writer, see wb_buffered_writer).
wb_send_frame <- function(con, type, payload = raw()) {
  type <- wb_type_code(type)
  if (is.character(payload)) payload <- charToRaw(enc2utf8(paste(payload, collapse = "")))
  if (!is.raw(payload)) stop("wb_send_frame: payload must be a raw vector or a string")
  if (length(payload) > WB_MAX_FRAME_BYTES)
    stop(wb_protocol_error(sprintf("%s frame of %.0f bytes exceeds the %.0f-byte bound",
                                   wb_message_name(type), length(payload), WB_MAX_FRAME_BYTES)))
  header <- wb_pack_header(type, length(payload))
  if (is.function(con)) {
    if (length(payload) < 65536L) con(c(header, payload)) else { con(header); con(payload) }
    return(invisible(NULL))
  }
  if (length(payload) < 65536L) {
    writeBin(c(header, payload), con)
  } else {
    writeBin(header, con)
    writeBin(payload, con)
  }
  flush(con)
  invisible(NULL)
}

# A write buffer in front of a connection: small frames written back to back
# would otherwise each wait for the peer's (delayed) ACK under Nagle's
# algorithm, which R sockets cannot switch off.  Returns list(write(bytes),
# write_vector(x, size), flush(), pending(), since_flush()).  Pieces of
# `direct` bytes or more are not copied into the buffer: what is pending goes
# first, then the piece itself (a vector's, written from the vector).
# The buffer is flushed when it holds `limit` bytes.
wb_buffered_writer <- function(con, limit = 4194304, direct = 65536) {
  st <- new.env(parent = emptyenv())
  st$chunks <- list()
  st$size <- 0
  st$last <- proc.time()[["elapsed"]]
  flush_out <- function() {
    send_pending()
    flush(con)
    st$last <- proc.time()[["elapsed"]]
    invisible(NULL)
  }
  send_pending <- function() {
    if (st$size > 0) {
      pending <- if (length(st$chunks) == 1L) st$chunks[[1L]] else do.call(c, st$chunks)
      st$chunks <- list()
      st$size <- 0
      writeBin(pending, con)
    }
  }
  write <- function(bytes) {
    if (length(bytes) >= min(limit, direct)) {
      send_pending()
      writeBin(bytes, con)
      st$last <- proc.time()[["elapsed"]]
      return(invisible(NULL))
    }
    st$chunks[[length(st$chunks) + 1L]] <- bytes
    st$size <- st$size + length(bytes)
    if (st$size >= limit) flush_out()
    invisible(NULL)
  }
  # a vector's values as `size`-byte little-endian numbers: a large one after
  # what is pending, by writeBin to the connection (no raw copy of it is made)
  write_vector <- function(x, size) {
    if (length(x) * size < min(limit, direct))
      return(write(writeBin(x, raw(), size = size, endian = "little")))
    send_pending()
    writeBin(x, con, size = size, endian = "little")
    st$last <- proc.time()[["elapsed"]]
    invisible(NULL)
  }
  list(write = write, write_vector = write_vector, flush = flush_out, pending = function() st$size,
       since_flush = function() proc.time()[["elapsed"]] - st$last)
}

wb_send_json <- function(con, type, obj) {
  wb_send_frame(con, type, charToRaw(wb_json_encode(obj)))
}

# A LOG record, {"level":..,"role":..,"message":..}: what wb_json_encode makes
# of list(level =, role =, message =) for three strings, in one escape
# (~12 us a line, where the general encoder took ~70 us; a task logs five).
wb_log_json <- function(level, role, message) {
  if (!is.character(message) || length(message) != 1L || is.na(message) ||
      !is.character(level) || length(level) != 1L || is.na(level) ||
      !is.character(role) || length(role) != 1L || is.na(role))
    return(wb_json_encode(list(level = level, role = role, message = message)))
  e <- wb_json_escape(c(level, role, message))
  paste0("{\"level\":", e[1L], ",\"role\":", e[2L], ",\"message\":", e[3L], "}")
}

# Read one frame; refuse unknown types and lengths above max_bytes.
wb_recv_frame <- function(con, max_bytes = WB_MAX_FRAME_BYTES) {
  header <- wb_read_exact(con, WB_HEADER_BYTES)
  v <- readBin(header, "integer", n = 2L, size = 4L, endian = "big")
  type <- v[1L]
  len <- as.numeric(v[2L])
  if (is.na(len)) len <- 2147483648          # 0x80000000 reads as NA
  if (len < 0) len <- len + 4294967296
  hex <- paste(as.character(header), collapse = "")
  name <- if (is.na(type)) NA_character_ else wb_message_name(type)
  if (is.na(name))
    stop(wb_protocol_error(sprintf("unknown message type %s (header %s)",
                                   if (is.na(type)) "-2147483648" else type, hex)))
  if (len > max_bytes)
    stop(wb_protocol_error(sprintf("%s frame announces %.0f bytes; the bound here is %.0f",
                                   name, len, max_bytes)))
  payload <- if (len > 0) wb_read_exact(con, len) else raw(0)
  list(type = type, name = name, payload = payload)
}

# Read one frame that must be of type `want`; return its payload.
wb_expect <- function(con, want, max_bytes = WB_MAX_FRAME_BYTES) {
  want <- wb_type_code(want)
  fr <- wb_recv_frame(con, max_bytes)
  if (fr$type != want)
    stop(wb_protocol_error(sprintf("expected %s, got %s", wb_message_name(want), fr$name)))
  fr$payload
}

wb_decode_json_payload <- function(payload) {
  txt <- rawToChar(payload)
  Encoding(txt) <- "UTF-8"
  tryCatch(wb_json_decode(txt),
           error = function(e)
             stop(wb_protocol_error(paste0("malformed JSON payload: ", conditionMessage(e)))))
}

# ---------------------------------------------------------------------------
# JSON encoder
#
# NULL -> null; length-1 atomic vectors -> scalars (unless wrapped in I(), which
# forces an array); other atomic vectors -> arrays; NA -> null; NaN/Inf -> null;
# named lists -> objects; unnamed lists -> arrays; factors -> strings;
# Date/POSIXct -> strings.  Strings are written as UTF-8, escaping only '"',
# '\' and control characters.

wb_json_escape <- function(s) {
  s <- enc2utf8(as.character(s))
  s <- gsub("\\", "\\\\", s, fixed = TRUE)
  s <- gsub("\"", "\\\"", s, fixed = TRUE)
  if (any(grepl("[\001-\037]", s, useBytes = TRUE))) {
    s <- gsub("\n", "\\n", s, fixed = TRUE)
    s <- gsub("\r", "\\r", s, fixed = TRUE)
    s <- gsub("\t", "\\t", s, fixed = TRUE)
    s <- gsub("\b", "\\b", s, fixed = TRUE)
    s <- gsub("\f", "\\f", s, fixed = TRUE)
    for (code in c(1:7, 11L, 14:31)) {
      ch <- rawToChar(as.raw(code))
      s <- gsub(ch, sprintf("\\u%04x", code), s, fixed = TRUE, useBytes = TRUE)
    }
    Encoding(s) <- "UTF-8"
  }
  paste0("\"", s, "\"")
}

wb_json_num <- function(x) {
  out <- character(length(x))
  bad <- is.na(x) | is.infinite(x)
  out[bad] <- "null"
  ok <- which(!bad)
  if (length(ok)) {
    v <- x[ok]
    whole <- v == round(v) & abs(v) < 2^53
    s <- character(length(v))
    s[whole] <- sprintf("%.0f", v[whole])
    fr <- which(!whole)
    if (length(fr)) {
      vf <- v[fr]
      sf <- sprintf("%.15g", vf)
      for (digits in c(16L, 17L)) {
        redo <- which(as.numeric(sf) != vf)
        if (!length(redo)) break
        sf[redo] <- sprintf(paste0("%.", digits, "g"), vf[redo])
      }
      s[fr] <- sf
    }
    out[ok] <- s
  }
  out
}

wb_json_atomic <- function(x) {
  if (is.factor(x)) x <- as.character(x)
  if (inherits(x, "Date") || inherits(x, "POSIXt")) x <- format(x)
  if (is.logical(x)) {
    out <- ifelse(is.na(x), "null", ifelse(x, "true", "false"))
  } else if (is.integer(x)) {
    out <- ifelse(is.na(x), "null", as.character(x))
  } else if (is.double(x)) {
    out <- wb_json_num(x)
  } else if (is.character(x)) {
    out <- character(length(x))
    na <- is.na(x)
    out[na] <- "null"
    out[!na] <- wb_json_escape(x[!na])
  } else if (is.complex(x) || is.raw(x)) {
    stop(sprintf("wb_json_encode: cannot encode a %s vector", typeof(x)))
  } else {
    stop(sprintf("wb_json_encode: cannot encode an object of type %s", typeof(x)))
  }
  out
}

wb_json_encode <- function(x) {
  if (is.null(x)) return("null")
  if (is.list(x) && !is.data.frame(x)) {
    nms <- names(x)
    if (!is.null(nms)) {
      if (length(x) == 0L) return("{}")
      nms[is.na(nms)] <- ""
      vals <- vapply(x, wb_json_encode, "", USE.NAMES = FALSE)
      return(paste0("{", paste0(wb_json_escape(nms), ":", vals, collapse = ","), "}"))
    }
    if (length(x) == 0L) return("[]")
    vals <- vapply(x, wb_json_encode, "", USE.NAMES = FALSE)
    return(paste0("[", paste0(vals, collapse = ","), "]"))
  }
  if (is.data.frame(x)) {
    # column-wise object
    return(wb_json_encode(as.list(x)))
  }
  if (is.atomic(x)) {
    as_array <- inherits(x, "AsIs") || length(x) != 1L
    if (inherits(x, "AsIs")) class(x) <- setdiff(class(x), "AsIs")
    vals <- wb_json_atomic(x)
    if (!as_array) return(vals)
    return(paste0("[", paste0(vals, collapse = ","), "]"))
  }
  stop(sprintf("wb_json_encode: cannot encode an object of type %s", typeof(x)))
}

# ---------------------------------------------------------------------------
# JSON decoder
#
# objects -> named lists (an empty object -> a list with empty names);
# arrays -> atomic vectors when all elements are scalars of one kind
#   (numbers, strings or booleans; null elements become NA); a one-element
#   such array is wrapped in I() so that wb_json_encode writes it back as an
#   array; other arrays (and all arrays when simplify = FALSE) -> lists;
# null -> NULL; numbers -> integer when integral and within int32, else double;
# strings -> UTF-8 character; true/false -> logical.

wb_json_decode <- function(txt, simplify = TRUE) {
  if (is.raw(txt)) { txt <- rawToChar(txt); Encoding(txt) <- "UTF-8" }
  if (!is.character(txt) || length(txt) != 1L || is.na(txt))
    stop("wb_json_decode: need one string")
  txt <- enc2utf8(txt)
  cp <- utf8ToInt(txt)
  if (length(cp) == 1L && is.na(cp)) stop("JSON text is not valid UTF-8")
  # the parser's state: the code points, where '"' and '\' are, and the position
  ps <- new.env(parent = emptyenv())
  ps$cp <- cp
  ps$n <- length(cp)
  ps$specials <- which(cp == 34L | cp == 92L)
  ps$i <- 1L
  ps$simplify <- simplify
  value <- .wbj_value(ps)
  .wbj_skip_ws(ps)
  if (ps$i <= ps$n) .wbj_fail(ps, "trailing characters after the JSON value")
  value
}

.wbj_fail <- function(ps, what) {
  i <- ps$i
  ctx <- if (i <= ps$n) intToUtf8(ps$cp[i:min(ps$n, i + 20L)]) else "<end of text>"
  stop(sprintf("JSON parse error at character %d: %s (near '%s')", i, what, ctx), call. = FALSE)
}

.wbj_skip_ws <- function(ps) {
  cp <- ps$cp
  n <- ps$n
  i <- ps$i
  while (i <= n && (cp[i] == 32L || cp[i] == 10L || cp[i] == 13L || cp[i] == 9L)) i <- i + 1L
  ps$i <- i
}

.wbj_value <- function(ps) {
  .wbj_skip_ws(ps)
  if (ps$i > ps$n) .wbj_fail(ps, "unexpected end of text")
  ch <- ps$cp[ps$i]
  if (ch == 123L) return(.wbj_object(ps))
  if (ch == 91L) return(.wbj_array(ps))
  if (ch == 34L) return(.wbj_string(ps))
  if (ch == 116L) return(.wbj_literal(ps, "true", TRUE))
  if (ch == 102L) return(.wbj_literal(ps, "false", FALSE))
  if (ch == 110L) return(.wbj_literal(ps, "null", NULL))
  if (ch == 45L || (ch >= 48L && ch <= 57L)) return(.wbj_number(ps))
  .wbj_fail(ps, "unexpected character")
}

# A string; ps$i points at the opening quote.  Runs between escapes are taken
# whole (the next '"' or '\' is found by findInterval over ps$specials).
.wbj_string <- function(ps) {
  cp <- ps$cp
  i <- ps$i + 1L
  parts <- character(0)
  repeat {
    k <- ps$specials[findInterval(i - 1L, ps$specials) + 1L]   # first special >= i
    if (is.na(k) || length(k) == 0L) { ps$i <- ps$n + 1L; .wbj_fail(ps, "unterminated string") }
    if (k > i) {
      seg <- cp[i:(k - 1L)]
      if (any(seg < 32L)) { ps$i <- i; .wbj_fail(ps, "control character in string") }
      parts[length(parts) + 1L] <- intToUtf8(seg)
    }
    if (cp[k] == 34L) { ps$i <- k + 1L; break }
    if (k + 1L > ps$n) { ps$i <- k; .wbj_fail(ps, "unterminated escape") }
    esc <- .wbj_escape(ps, k)
    parts[length(parts) + 1L] <- esc$text
    i <- esc$next_i
  }
  s <- paste(parts, collapse = "")
  Encoding(s) <- "UTF-8"
  s
}

# The escape at position k (a backslash): list(text, next_i).
.wbj_escape <- function(ps, k) {
  cp <- ps$cp
  e <- cp[k + 1L]
  if (e != 117L) {
    ch <- switch(intToUtf8(e),
                 "\"" = "\"", "\\" = "\\", "/" = "/", "b" = "\b", "f" = "\f",
                 "n" = "\n", "r" = "\r", "t" = "\t",
                 { ps$i <- k; .wbj_fail(ps, "invalid escape") })
    return(list(text = ch, next_i = k + 2L))
  }
  code <- .wbj_hex4(ps, k + 2L)                          # \uXXXX
  nxt <- k + 6L
  if (code >= 0xD800 && code <= 0xDBFF) {
    if (nxt + 5L <= ps$n && cp[nxt] == 92L && cp[nxt + 1L] == 117L) {
      lo <- .wbj_hex4(ps, nxt + 2L)
      if (lo >= 0xDC00 && lo <= 0xDFFF) {
        code <- 0x10000 + (code - 0xD800) * 1024 + (lo - 0xDC00)
        nxt <- nxt + 6L
      } else code <- 0xFFFD
    } else code <- 0xFFFD
  } else if (code >= 0xDC00 && code <= 0xDFFF) code <- 0xFFFD
  if (code == 0) { ps$i <- k; .wbj_fail(ps, "\\u0000 cannot be represented in an R string") }
  list(text = intToUtf8(code), next_i = nxt)
}

.wbj_hex4 <- function(ps, p) {
  if (p + 3L > ps$n) { ps$i <- p; .wbj_fail(ps, "truncated \\u escape") }
  h <- intToUtf8(ps$cp[p:(p + 3L)])
  if (!grepl("^[0-9A-Fa-f]{4}$", h)) { ps$i <- p; .wbj_fail(ps, "invalid \\u escape") }
  strtoi(h, 16L)
}

.wbj_number <- function(ps) {
  cp <- ps$cp
  i <- ps$i
  j <- i
  while (j <= ps$n && (cp[j] >= 48L && cp[j] <= 57L || cp[j] == 45L || cp[j] == 43L ||
                       cp[j] == 46L || cp[j] == 101L || cp[j] == 69L)) j <- j + 1L
  s <- intToUtf8(cp[i:(j - 1L)])
  if (!grepl("^-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?$", s)) .wbj_fail(ps, "invalid number")
  ps$i <- j
  v <- as.numeric(s)
  if (!grepl("[.eE]", s) && abs(v) <= 2147483647) as.integer(v) else v
}

.wbj_literal <- function(ps, word, value) {
  w <- utf8ToInt(word)
  m <- length(w)
  if (ps$i + m - 1L > ps$n || any(ps$cp[ps$i:(ps$i + m - 1L)] != w)) .wbj_fail(ps, "invalid literal")
  ps$i <- ps$i + m
  value
}

.wbj_object <- function(ps) {
  ps$i <- ps$i + 1L
  keys <- character(0)
  vals <- list()
  .wbj_skip_ws(ps)
  if (ps$i <= ps$n && ps$cp[ps$i] == 125L) {
    ps$i <- ps$i + 1L
    return(structure(list(), names = character(0)))
  }
  repeat {
    .wbj_skip_ws(ps)
    if (ps$i > ps$n || ps$cp[ps$i] != 34L) .wbj_fail(ps, "expected a string key")
    key <- .wbj_string(ps)
    .wbj_skip_ws(ps)
    if (ps$i > ps$n || ps$cp[ps$i] != 58L) .wbj_fail(ps, "expected ':'")
    ps$i <- ps$i + 1L
    v <- .wbj_value(ps)
    idx <- length(keys) + 1L
    keys[idx] <- key
    vals[idx] <- list(v)
    .wbj_skip_ws(ps)
    if (ps$i > ps$n) .wbj_fail(ps, "unterminated object")
    if (ps$cp[ps$i] == 44L) { ps$i <- ps$i + 1L; next }
    if (ps$cp[ps$i] == 125L) { ps$i <- ps$i + 1L; break }
    .wbj_fail(ps, "expected ',' or '}'")
  }
  names(vals) <- keys
  vals
}

.wbj_array <- function(ps) {
  ps$i <- ps$i + 1L
  vals <- list()
  .wbj_skip_ws(ps)
  if (ps$i <= ps$n && ps$cp[ps$i] == 93L) { ps$i <- ps$i + 1L; return(list()) }
  repeat {
    v <- .wbj_value(ps)
    vals[length(vals) + 1L] <- list(v)
    .wbj_skip_ws(ps)
    if (ps$i > ps$n) .wbj_fail(ps, "unterminated array")
    if (ps$cp[ps$i] == 44L) { ps$i <- ps$i + 1L; next }
    if (ps$cp[ps$i] == 93L) { ps$i <- ps$i + 1L; break }
    .wbj_fail(ps, "expected ',' or ']'")
  }
  if (ps$simplify) .wbj_simplify(vals) else vals
}

# An array of scalars of one kind as an atomic vector (null -> NA); a single
# element wrapped in I() so that the encoder writes it back as an array.
.wbj_simplify <- function(vals) {
  isnull <- vapply(vals, is.null, TRUE)
  if (all(isnull)) return(vals)
  nn <- vals[!isnull]
  scalar <- vapply(nn, function(v) is.atomic(v) && length(v) == 1L && !inherits(v, "AsIs"), TRUE)
  if (!all(scalar)) return(vals)
  kinds <- vapply(nn, function(v) if (is.numeric(v)) "n" else typeof(v), "")
  if (length(unique(kinds)) != 1L) return(vals)
  na <- switch(kinds[1L], n = NA, character = NA_character_, logical = NA)
  vals[isnull] <- list(na)
  out <- unlist(vals, use.names = FALSE)
  if (length(out) == 1L) out <- I(out)
  out
}
