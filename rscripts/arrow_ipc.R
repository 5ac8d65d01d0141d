# Arrow IPC *stream* reader and writer in base R.
#
# Written from the Arrow columnar format specification (encapsulated messages,
# Schema.fbs, Message.fbs).  No packages: the flatbuffer reader and builder
# below are minimal and cover what the Schema, RecordBatch and DictionaryBatch
# messages need.
#
# Public functions:
#   arrow_read_stream(src, int64 = c("double", "character"), factors = FALSE,
#                     on_batch = NULL, timing = NULL, keep = NULL)
#       src: a binary connection (read message by message; never reads past
#       the end-of-stream marker), a raw vector, or a file path.
#       Returns a base data.frame (check.names = FALSE, stringsAsFactors = FALSE).
#       With on_batch = function(frame): each record batch is passed to it as
#       a data.frame as soon as it is decoded, nothing is accumulated, and the
#       result is invisible(list(names, nrows, nbatches)); an error of on_batch
#       is re-raised unchanged once the rest of the stream has been consumed.
#       timing: NULL, or an environment whose `transfer` (seconds) grows by the
#       time spent reading from src.
#       keep: NULL, or an environment whose `cols` gets, for a stream read
#       whole, each column as returned, list(index = its 0-based position,
#       name, x = the column, kind = what it comes back as, .ai_ref_kind); pass it
#       to arrow_prepare_frame so that a column the caller leaves as it is can
#       be named, not written (see `known` below).
#   arrow_skip_stream(src)
#       Consumes a stream up to its end-of-stream marker without decoding it.
#   arrow_write_stream(df, con = NULL, batch_rows = 1048576L, vectors = FALSE)
#       Writes df as an Arrow IPC stream to the binary connection `con` (or
#       hands the bytes, piece by piece, to `con` when it is a function), or
#       returns the stream as a raw vector when con is NULL.  vectors = TRUE:
#       the function `con` is also handed pieces of class "ai_vec", list(x,
#       size), meaning writeBin(x, size = size, endian = "little"), so that a
#       connection behind it can write a column with no raw copy.
#   arrow_stream_writer(con = NULL, batch_rows = 1048576L, vectors = FALSE)
#       list(write(df_or_prepared), close()): one stream written frame by
#       frame (schema with the first frame, end-of-stream marker on close;
#       later frames must have the first frame's columns).
#   arrow_prepare_frame(df, known = NULL, int64_names = NULL)
#       Checks and converts the columns of df for writing (raises an
#       arrow_codec_error naming the column if one cannot be written); the
#       result can be passed to arrow_write_stream instead of df.
#       known: keep$cols of a read.  A column identical() to a kept one
#       (bit for bit, attributes included) whose Arrow type would come back
#       unchanged is written as a column of type Null holding nothing, and
#       prep$refs maps its 0-based position to the kept one's (int64 columns:
#       only those named in int64_names, for int64 = "character" too).  The
#       reader of the stream, which sent the kept columns, puts them back
#       (the Worker: workerbridge/task/passthrough.py).  A frame of no rows
#       names none.
#
# Errors are conditions of class "arrow_codec_error" (a column or its type
# cannot be decoded/encoded; $column names it; when reading, the rest of the
# stream is consumed first so a socket stays in step) or "arrow_stream_error"
# (truncated or corrupt framing/metadata), both also of class "error".

# ---------------------------------------------------------------------------
# Conditions

.ai_codec_error <- function(msg, column = NA_character_) {
  structure(class = c("arrow_codec_error", "error", "condition"),
            list(message = msg, call = NULL, column = column))
}
.ai_stream_error <- function(msg) {
  structure(class = c("arrow_stream_error", "error", "condition"),
            list(message = msg, call = NULL))
}
.ai_col_error <- function(name, msg) {
  stop(.ai_codec_error(sprintf("column '%s': %s", name, msg), column = name))
}

# ---------------------------------------------------------------------------
# Little-endian scalar access on a raw vector (0-based positions), bounds checked

# Buffers of fixed-width values are read from the source as R vectors (no
# raw copy): "double" (8-byte values, also int64 bit patterns), "int32", or
# "raw".  These helpers take a buffer in any of those forms.
.ai_kind_size <- c(double = 8L, int32 = 4L)
.ai_nbytes <- function(b) if (is.double(b)) 8 * length(b) else if (is.integer(b)) 4 * length(b) else length(b)
.ai_first <- function(x, n) if (length(x) == n) x else x[seq_len(n)]
# n values of a buffer: its first n when it was read as a vector, else read
# from its raw bytes as `what` of `size` bytes each
.ai_values <- function(b, n, what, size)
  if (is.raw(b)) readBin(b, what, n = n, size = size, endian = "little") else .ai_first(b, n)
# the first n values' bytes of a buffer read as doubles (size 8) or integers
.ai_raw_of <- function(b, n, size) {
  if (is.raw(b)) return(b)
  writeBin(.ai_first(b, min(n, length(b))), raw(), size = size, endian = "little")
}
# one buffer of `len` bytes from the connection (or raw vector), as `kind`
.ai_read_buffer <- function(con, len, kind) {
  if (kind == "raw") return(readBin(con, "raw", len))
  size <- .ai_kind_size[[kind]]
  n <- len %/% size
  x <- readBin(con, if (kind == "double") "double" else "integer", n = n, size = size,
               endian = "little")
  if (length(x) == n && len > n * size) readBin(con, "raw", len - n * size)   # a ragged tail
  x
}
# the kind of each of a field's buffers (validity and data buffers stay raw)
.ai_field_kinds <- function(f) {
  nb <- .ai_nbuffers(f)
  if (nb < 2L) return(rep("raw", nb))
  t <- f$type
  values <- if (!is.null(f$dict)) {
    if (f$dict$bitWidth == 32L && isTRUE(f$dict$signed)) "int32" else "raw"
  } else switch(t$kind,
    Int = if (t$bitWidth == 64L) "double" else if (t$bitWidth == 32L && t$signed) "int32" else "raw",
    FloatingPoint = if (t$precision == 2L) "double" else "raw",
    Utf8 = , Binary = "int32",
    Date = if (t$unit == 0L) "int32" else "double",
    Timestamp = "double",
    "raw")
  c("raw", values, rep("raw", nb - 2L))
}

.ai_check <- function(buf, pos, k) {
  if (is.na(pos) || pos < 0 || pos + k > length(buf))
    stop(.ai_stream_error(sprintf(
      "corrupt Arrow metadata: read of %d bytes at offset %.0f outside a %d-byte flatbuffer",
      k, pos, length(buf))))
}
.ai_u8 <- function(buf, pos) { .ai_check(buf, pos, 1L); as.integer(buf[pos + 1]) }
.ai_i16 <- function(buf, pos) {
  .ai_check(buf, pos, 2L)
  readBin(buf[pos + 1:2], "integer", size = 2L, signed = TRUE, endian = "little")
}
.ai_u16 <- function(buf, pos) {
  .ai_check(buf, pos, 2L)
  readBin(buf[pos + 1:2], "integer", size = 2L, signed = FALSE, endian = "little")
}
.ai_i32 <- function(buf, pos) {
  .ai_check(buf, pos, 4L)
  v <- readBin(buf[pos + 1:4], "integer", size = 4L, endian = "little")
  if (is.na(v)) -2147483648 else v
}
.ai_u32 <- function(buf, pos) {
  v <- .ai_i32(buf, pos)
  if (v < 0) v + 4294967296 else v
}
.ai_i64 <- function(buf, pos) {
  .ai_check(buf, pos, 8L)
  .ai_i64_vec(buf[pos + 1:8], 1L)
}

# n int64 (or uint64) values from 8*n little-endian bytes -> doubles (hi and lo
# 32-bit halves combined; correctly rounded beyond 2^53).
.ai_i64_halves <- function(bytes, n, signed = TRUE) {
  bytes <- .ai_raw_of(bytes, n, 8L)
  v <- readBin(bytes, "integer", n = 2L * n, size = 4L, endian = "little")
  lo <- v[c(TRUE, FALSE)]
  hi <- v[c(FALSE, TRUE)]
  lo <- as.numeric(lo)
  hi <- as.numeric(hi)
  lo[is.na(lo)] <- -2147483648
  hi[is.na(hi)] <- -2147483648
  lo <- lo + (lo < 0) * 4294967296
  if (!signed) hi <- hi + (hi < 0) * 4294967296
  list(hi = hi, lo = lo)
}
# Non-negative int64 values below 2^52 have the bit patterns of subnormal
# doubles: x * 2^-1074.  Read as doubles and scaled back by 2^1074 (in two
# exact steps), they need no integer arithmetic at all.  Used when every value
# is in that range (and the FPU keeps subnormals: checked on a sentinel).
.ai_subnormal_one <- as.raw(c(1, 0, 0, 0, 0, 0, 0, 0))
.ai_keeps_subnormals <- function()
  readBin(.ai_subnormal_one, "double", size = 8L) * 2^537 * 2^537 == 1
# The double whose bit pattern is the int64 2^31.
.ai_subnormal_2_31 <- 2147483648 * 2^-537 * 2^-537
.ai_i64_vec <- function(bytes, n, signed = TRUE) {
  if (n == 0) return(numeric(0))
  x <- .ai_values(bytes, n, "double", 8L)
  # Told apart by comparisons alone (arithmetic on subnormals is slow on x86:
  # a microcode assist each): every value in [0, 2^52) exactly when all are
  # below the smallest normal double, NaN, Inf and negatives excluded; a zero
  # must be +0 (-0 is the pattern of -2^63).
  top <- if (anyNA(x) || min(x) < 0) Inf else max(x)
  if (top < 2^-1022 && (min(x) > 0 || all(1 / x[which(x == 0)] > 0)) &&
      .ai_keeps_subnormals()) {
    # all in [0, 2^31) (the common case: ids, counts): read again as 8-byte
    # integers, which R narrows to int exactly in that range (2.5M values
    # 0.05 s, against 0.10 s scaled); else scaled at once (the readBin result
    # is reused in place: one vector made)
    if (top < .ai_subnormal_2_31)
      return(as.double(readBin(.ai_raw_of(bytes, n, 8L), "integer", n = n, size = 8L,
                               endian = "little")))
    return(x * 2^537 * 2^537)
  }
  x <- NULL
  bytes <- .ai_raw_of(bytes, n, 8L)
  v <- readBin(bytes, "integer", n = 2L * n, size = 4L, endian = "little")
  if (anyNA(v)) {                    # a half is 0x80000000: the general path
    h <- .ai_i64_halves(bytes, n, signed)
    return(h$hi * 4294967296 + h$lo)
  }
  dim(v) <- c(2L, n)
  lo <- v[1L, ]
  hi <- v[2L, ]
  # both halves made exact non-negative/signed doubles first, so that the sum
  # is rounded once (correct rounding beyond 2^53)
  lo <- lo + (lo < 0L) * 4294967296
  if (!signed) hi <- hi + (hi < 0L) * 4294967296
  hi * 4294967296 + lo
}

# |value| = q * d + r exactly, for d <= 1e9, from the 32-bit halves.
.ai_i64_divmod <- function(h, d, signed = TRUE) {
  hi <- h$hi
  lo <- h$lo
  neg <- if (signed) hi < 0 else logical(length(hi))
  if (any(neg)) {
    w <- which(neg)
    carry <- lo[w] == 0
    lo[w] <- ifelse(carry, 0, 4294967296 - lo[w])
    hi[w] <- -hi[w] - ifelse(carry, 0, 1)
  }
  h1 <- floor(hi / 65536)
  l1 <- floor(lo / 65536)
  limbs <- list(h1, hi - h1 * 65536, l1, lo - l1 * 65536)
  r <- numeric(length(hi))
  q <- numeric(length(hi))
  for (l in limbs) {
    cur <- r * 65536 + l
    qd <- floor(cur / d)
    r <- cur - qd * d
    fix <- r < 0
    if (any(fix)) { qd[fix] <- qd[fix] - 1; r[fix] <- r[fix] + d }
    q <- q * 65536 + qd
  }
  list(neg = neg, q = q, r = r)
}

.ai_i64_to_character <- function(h, signed = TRUE) {
  dm <- .ai_i64_divmod(h, 1e9, signed)
  q2 <- floor(dm$q / 1e9)
  r1 <- dm$q - q2 * 1e9
  out <- ifelse(q2 > 0, sprintf("%.0f%09.0f%09.0f", q2, r1, dm$r),
                ifelse(r1 > 0, sprintf("%.0f%09.0f", r1, dm$r), sprintf("%.0f", dm$r)))
  out[dm$neg] <- paste0("-", out[dm$neg])
  out
}

# int64 bytes from doubles that hold integral values (|x| < 2^63); NA as 0.
# 0 <= x < 2^52 (the usual case): the bit patterns of the subnormal doubles
# x * 2^-1074 (see .ai_i64_vec; "+ 0" turns -0 into +0).
.ai_int64_bytes <- function(x) .ai_piece_raw(.ai_int64_piece(x))
.ai_int64_piece <- function(x) {
  if (anyNA(x)) x[is.na(x)] <- 0
  if (length(x) && min(x) >= 0 && max(x) < 4503599627370496 && .ai_keeps_subnormals())
    return(.ai_vec(x * 2^-537 * 2^-537 + 0, 8L))
  hi <- floor(x / 4294967296)
  lo <- x - hi * 4294967296
  lo <- lo - (lo >= 2147483648) * 4294967296
  .ai_int32_pattern <- function(v) {
    out <- rep(NA_integer_, length(v))          # NA_integer_ is the pattern of -2^31
    ok <- v != -2147483648
    out[ok] <- as.integer(v[ok])
    out
  }
  .ai_vec(as.vector(rbind(.ai_int32_pattern(lo), .ai_int32_pattern(hi))), 4L)
}

# A piece of a message body: a raw vector, or an R vector written as it is
# (little-endian, `size` bytes a value; class "ai_vec").  A connection takes
# an ai_vec with one writeBin and no copy: writing a numeric column that way
# is ~10x faster than making its raw vector first, and leaves no garbage.
.ai_vec <- function(x, size) structure(list(x = x, size = size), class = "ai_vec")
.ai_piece_len <- function(p) if (inherits(p, "ai_vec")) length(p$x) * p$size else length(p)
.ai_piece_raw <- function(p)
  if (inherits(p, "ai_vec")) writeBin(p$x, raw(), size = p$size, endian = "little") else p
.ai_write_piece <- function(p, con)
  if (inherits(p, "ai_vec")) writeBin(p$x, con, size = p$size, endian = "little") else writeBin(p, con)

# ---------------------------------------------------------------------------
# Minimal flatbuffer reader

.fb_table <- function(buf, pos) {
  vt <- pos - .ai_i32(buf, pos)
  vtlen <- .ai_u16(buf, vt)
  if (vtlen < 4L || vtlen %% 2L != 0L) stop(.ai_stream_error("corrupt Arrow metadata: bad vtable"))
  list(buf = buf, pos = pos, vt = vt, vtlen = vtlen)
}
.fb_field_pos <- function(t, slot) {
  if (is.null(t)) return(NA)
  at <- 4L + 2L * slot
  if (at + 2L > t$vtlen) return(NA)
  off <- .ai_u16(t$buf, t$vt + at)
  if (off == 0L) NA else t$pos + off
}
.fb_scalar <- function(t, slot, reader, default) {
  p <- .fb_field_pos(t, slot)
  if (is.na(p)) default else reader(t$buf, p)
}
.fb_bool <- function(t, slot, default = FALSE) .fb_scalar(t, slot, .ai_u8, as.integer(default)) != 0L
.fb_ref <- function(t, slot) {
  p <- .fb_field_pos(t, slot)
  if (is.na(p)) NA else p + .ai_u32(t$buf, p)
}
.fb_subtable <- function(t, slot) {
  p <- .fb_ref(t, slot)
  if (is.na(p)) NULL else .fb_table(t$buf, p)
}
.fb_string <- function(t, slot) {
  p <- .fb_ref(t, slot)
  if (is.na(p)) return(NA_character_)
  len <- .ai_u32(t$buf, p)
  .ai_check(t$buf, p + 4, len)
  if (len == 0) return("")
  bytes <- t$buf[p + 4 + seq_len(len)]
  if (any(bytes == as.raw(0L))) stop(.ai_stream_error("corrupt Arrow metadata: NUL in a string"))
  s <- rawToChar(bytes)
  Encoding(s) <- "UTF-8"
  s
}
.fb_vector <- function(t, slot, elem_size) {
  p <- .fb_ref(t, slot)
  if (is.na(p)) return(NULL)
  len <- .ai_u32(t$buf, p)
  .ai_check(t$buf, p + 4, len * elem_size)
  list(start = p + 4, len = len)
}
.fb_table_vector <- function(t, slot) {
  v <- .fb_vector(t, slot, 4L)
  if (is.null(v) || v$len == 0) return(list())
  lapply(seq_len(v$len) - 1, function(i) {
    e <- v$start + 4 * i
    .fb_table(t$buf, e + .ai_u32(t$buf, e))
  })
}
# vector of 16-byte structs of two int64 -> list(a = <double>, b = <double>)
.fb_pair_vector <- function(t, slot) {
  v <- .fb_vector(t, slot, 16L)
  if (is.null(v) || v$len == 0) return(list(a = numeric(0), b = numeric(0)))
  x <- .ai_i64_vec(t$buf[v$start + seq_len(16 * v$len)], 2L * v$len)
  list(a = x[c(TRUE, FALSE)], b = x[c(FALSE, TRUE)])
}

# ---------------------------------------------------------------------------
# Minimal flatbuffer builder (forward layout: children after their parents,
# so every uoffset points forward; vtables precede their tables).

.fbb_field <- function(slot, type, value) list(slot = slot, type = type, value = value)
.fbb_table <- function(...) list(kind = "table", fields = list(...))
.fbb_string <- function(s) list(kind = "string", value = s)
.fbb_tables <- function(items) list(kind = "tables", items = items)
.fbb_structs <- function(bytes, n) list(kind = "structs", bytes = bytes, n = n)

.fbb_sizes <- c(u8 = 1L, bool = 1L, i16 = 2L, i32 = 4L, i64 = 8L, off = 4L)

.fbb_scalar_bytes <- function(type, value) {
  switch(type,
         u8 = , bool = as.raw(as.integer(value)),
         i16 = writeBin(as.integer(value), raw(), size = 2L, endian = "little"),
         i32 = writeBin(as.integer(value), raw(), size = 4L, endian = "little"),
         i64 = .ai_int64_bytes(as.numeric(value)),
         off = raw(4L))
}

.fbb_build <- function(root) {
  b <- new.env(parent = emptyenv())
  b$buf <- raw(1024L)
  b$size <- 0
  put <- function(pos, bytes) {
    need <- pos + length(bytes)
    if (need > length(b$buf)) {
      nb <- raw(max(need, 2 * length(b$buf)))
      nb[seq_len(b$size)] <- b$buf[seq_len(b$size)]
      b$buf <- nb
    }
    if (length(bytes)) b$buf[pos + seq_along(bytes)] <- bytes
    if (need > b$size) b$size <- need
  }
  align <- function(a, plus = 0) {
    pad <- (a - (b$size + plus) %% a) %% a
    if (pad) put(b$size, raw(pad))
  }
  u32 <- function(v) writeBin(as.integer(v), raw(), size = 4L, endian = "little")
  patch <- function(at, target) put(at, u32(target - at))
  emit <- function(obj) {
    switch(obj$kind,
      string = {
        bytes <- charToRaw(enc2utf8(obj$value))
        align(4)
        pos <- b$size
        put(pos, c(u32(length(bytes)), bytes, as.raw(0L)))
        pos
      },
      structs = {
        align(8, plus = 4)
        pos <- b$size
        put(pos, c(u32(obj$n), obj$bytes))
        pos
      },
      tables = {
        align(4)
        pos <- b$size
        n <- length(obj$items)
        put(pos, c(u32(n), raw(4L * n)))
        for (i in seq_len(n)) patch(pos + 4L * i, emit(obj$items[[i]]))
        pos
      },
      table = {
        fields <- obj$fields
        nf <- length(fields)
        sizes <- vapply(fields, function(f) .fbb_sizes[[f$type]], 1L)
        ord <- order(-sizes)
        offs <- integer(nf)
        cur <- 4L
        for (i in ord) {
          s <- sizes[i]
          cur <- cur + (s - cur %% s) %% s
          offs[i] <- cur
          cur <- cur + s
        }
        tsize <- cur
        nslots <- if (nf) max(vapply(fields, function(f) f$slot, 1L)) + 1L else 0L
        vt <- integer(nslots)
        for (i in seq_len(nf)) vt[fields[[i]]$slot + 1L] <- offs[i]
        align(2)
        vpos <- b$size
        put(vpos, writeBin(as.integer(c(4L + 2L * nslots, tsize, vt)), raw(), size = 2L,
                           endian = "little"))
        align(8)
        tpos <- b$size
        body <- raw(tsize)
        body[1:4] <- writeBin(as.integer(tpos - vpos), raw(), size = 4L, endian = "little")
        for (i in seq_len(nf)) {
          f <- fields[[i]]
          body[offs[i] + seq_len(sizes[i])] <- .fbb_scalar_bytes(f$type, f$value)
        }
        put(tpos, body)
        for (i in seq_len(nf)) {
          f <- fields[[i]]
          if (f$type == "off") patch(tpos + offs[i], emit(f$value))
        }
        tpos
      })
  }
  put(0, raw(4L))
  patch(0, emit(root))
  align(8)
  b$buf[seq_len(b$size)]
}

# ---------------------------------------------------------------------------
# Arrow type descriptors

.ai_type_ids <- c("NONE", "Null", "Int", "FloatingPoint", "Binary", "Utf8", "Bool", "Decimal",
                  "Date", "Time", "Timestamp", "Interval", "List", "Struct_", "Union",
                  "FixedSizeBinary", "FixedSizeList", "Map", "Duration", "LargeBinary",
                  "LargeUtf8", "LargeList", "RunEndEncoded", "BinaryView", "Utf8View",
                  "ListView", "LargeListView")
.ai_time_units <- c("s", "ms", "us", "ns")

.ai_parse_type <- function(type_id, tt) {
  kind <- if (type_id >= 0 && type_id < length(.ai_type_ids)) .ai_type_ids[type_id + 1L] else "unknown"
  d <- list(kind = kind, supported = FALSE, name = tolower(kind))
  switch(kind,
    Null = { d$name <- "null"; d$supported <- TRUE },
    Int = {
      bw <- .fb_scalar(tt, 0L, .ai_i32, 0L)
      sg <- .fb_bool(tt, 1L)
      d$bitWidth <- bw; d$signed <- sg
      d$name <- sprintf("%sint%d", if (sg) "" else "u", bw)
      d$supported <- bw %in% c(8L, 16L, 32L, 64L)
    },
    FloatingPoint = {
      p <- .fb_scalar(tt, 0L, .ai_i16, 0L)
      d$precision <- p
      d$name <- c("float16", "float32", "float64")[p + 1L]
      if (is.na(d$name)) d$name <- "float?"
      d$supported <- p %in% c(1L, 2L)
    },
    Binary = { d$name <- "binary"; d$supported <- TRUE },
    LargeBinary = { d$name <- "large_binary"; d$supported <- TRUE },
    Utf8 = { d$name <- "utf8"; d$supported <- TRUE },
    LargeUtf8 = { d$name <- "large_utf8"; d$supported <- TRUE },
    Bool = { d$name <- "bool"; d$supported <- TRUE },
    Decimal = {
      d$precision <- .fb_scalar(tt, 0L, .ai_i32, 0L)
      d$scale <- .fb_scalar(tt, 1L, .ai_i32, 0L)
      d$bitWidth <- .fb_scalar(tt, 2L, .ai_i32, 128L)
      d$name <- sprintf("decimal%d(%d, %d)", d$bitWidth, d$precision, d$scale)
      d$supported <- d$bitWidth %in% c(128L, 256L)
    },
    Date = {
      d$unit <- .fb_scalar(tt, 0L, .ai_i16, 1L)
      d$name <- if (d$unit == 0L) "date32[day]" else "date64[ms]"
      d$supported <- d$unit %in% c(0L, 1L)
    },
    Time = {
      u <- .fb_scalar(tt, 0L, .ai_i16, 1L)
      d$name <- sprintf("time%d[%s]", .fb_scalar(tt, 1L, .ai_i32, 32L), .ai_time_units[u + 1L])
    },
    Timestamp = {
      d$unit <- .fb_scalar(tt, 0L, .ai_i16, 0L)
      d$tz <- .fb_string(tt, 1L)
      d$name <- sprintf("timestamp[%s%s]", .ai_time_units[d$unit + 1L],
                        if (is.na(d$tz)) "" else paste0(", tz=", d$tz))
      d$supported <- d$unit %in% 0:3
    },
    Duration = {
      u <- .fb_scalar(tt, 0L, .ai_i16, 1L)
      d$name <- sprintf("duration[%s]", .ai_time_units[u + 1L])
    },
    Interval = { d$name <- "interval" },
    List = { d$name <- "list" },
    LargeList = { d$name <- "large_list" },
    Struct_ = { d$name <- "struct" },
    Union = { d$name <- "union" },
    FixedSizeBinary = { d$name <- sprintf("fixed_size_binary[%d]", .fb_scalar(tt, 0L, .ai_i32, 0L)) },
    FixedSizeList = { d$name <- "fixed_size_list" },
    Map = { d$name <- "map" },
    RunEndEncoded = { d$name <- "run_end_encoded" },
    BinaryView = { d$name <- "binary_view" },
    Utf8View = { d$name <- "string_view" },
    ListView = { d$name <- "list_view" },
    LargeListView = { d$name <- "large_list_view" },
    { d$name <- sprintf("unknown type id %d", type_id) })
  d
}

.ai_parse_field <- function(ft) {
  name <- .fb_string(ft, 0L)
  if (is.na(name)) name <- ""
  type_id <- .fb_scalar(ft, 2L, .ai_u8, 0L)
  type <- .ai_parse_type(type_id, .fb_subtable(ft, 3L))
  dict <- NULL
  de <- .fb_subtable(ft, 4L)
  if (!is.null(de)) {
    it <- .fb_subtable(de, 1L)
    dict <- list(id = .fb_scalar(de, 0L, .ai_i64, 0),
                 bitWidth = if (is.null(it)) 32L else .fb_scalar(it, 0L, .ai_i32, 32L),
                 signed = if (is.null(it)) TRUE else .fb_bool(it, 1L),
                 ordered = .fb_bool(de, 2L))
  }
  nchildren <- length(.fb_table_vector(ft, 5L))
  list(name = name, type = type, dict = dict, nchildren = nchildren)
}

.ai_field_type_name <- function(f) {
  if (is.null(f$dict)) f$type$name
  else sprintf("dictionary<values=%s, indices=%sint%d>", f$type$name,
               if (f$dict$signed) "" else "u", f$dict$bitWidth)
}

# ---------------------------------------------------------------------------
# Byte sources

.ai_source <- function(src, timing = NULL) {
  s <- new.env(parent = emptyenv())
  if (is.character(src)) {
    s$con <- file(src, "rb")
    s$close <- TRUE
  } else if (is.raw(src)) {
    s$con <- rawConnection(src, "rb")
    s$close <- TRUE
  } else if (inherits(src, "connection")) {
    s$con <- src
    s$close <- FALSE
  } else {
    stop("arrow_read_stream: src must be a connection, a raw vector or a file path")
  }
  # read up to n bytes; fewer only at EOF
  # (reads in pieces of at most 64 MiB, so that a corrupt length cannot make
  # readBin allocate a huge vector up front)
  s$read <- function(n) {
    if (n <= 0) return(raw(0))
    first <- readBin(s$con, "raw", min(n, 67108864))
    got <- as.numeric(length(first))
    if (got == n || got == 0L) return(first)
    chunks <- list(first)
    while (got < n) {
      chunk <- readBin(s$con, "raw", min(n - got, 67108864))
      if (length(chunk) == 0L) break
      chunks[[length(chunks) + 1L]] <- chunk
      got <- got + length(chunk)
    }
    do.call(c, chunks)
  }
  # a buffer of fixed-width values straight from the connection as `kind`
  read_values <- function(len, kind) .ai_read_buffer(s$con, len, kind)
  if (!is.null(timing)) {
    timed <- function(f) {
      force(f)                         # the untimed function, not a promise of s$read
      function(...) {
        t0 <- as.numeric(Sys.time())
        on.exit(timing$transfer <- timing$transfer + as.numeric(Sys.time()) - t0)
        f(...)
      }
    }
    s$read <- timed(s$read)
    read_values <- timed(read_values)
  }
  # one buffer as `kind` (see .ai_read_buffer); past 64 MiB read as raw
  # first, so that a corrupt length cannot allocate a huge vector up front
  s$read_buffer <- function(len, kind) {
    if (kind == "raw" || len > 67108864) {
      x <- s$read_exact(len, "message body")
      return(if (kind == "raw") x else .ai_read_buffer(x, len, kind))
    }
    x <- read_values(len, kind)
    if (.ai_nbytes(x) < len %/% .ai_kind_size[[kind]] * .ai_kind_size[[kind]])
      stop(.ai_stream_error(sprintf(
        "truncated Arrow stream: expected %.0f bytes of message body, got %.0f", len, .ai_nbytes(x))))
    x
  }
  s$skip <- function(n, what) {
    while (n > 0) {
      k <- min(n, 16777216)
      s$read_exact(k, what)
      n <- n - k
    }
  }
  s$read_exact <- function(n, what) {
    x <- s$read(n)
    if (length(x) < n)
      stop(.ai_stream_error(sprintf(
        "truncated Arrow stream: expected %.0f bytes of %s, got %.0f", n, what, length(x))))
    x
  }
  s
}

.ai_max_metadata <- 268435456     # 256 MiB
.ai_max_body <- 17179869184       # 16 GiB

# Read one encapsulated message.  Returns NULL at EOF (before any byte),
# list(eos = TRUE) at the end-of-stream marker, else list(version,
# header_type, header, body_length, buffers, buffer_error): for record and
# dictionary batches `buffers` holds the body's buffers (NULL for empty ones),
# read straight from the source, each as the kind that kinds(root) gives
# (a character vector, see .ai_read_buffer; NULL or missing: raw); other
# bodies are skipped.
.ai_read_message <- function(s, kinds = NULL) {
  b4 <- s$read(4L)
  if (length(b4) == 0L) return(NULL)
  if (length(b4) < 4L)
    stop(.ai_stream_error(sprintf("truncated Arrow stream: %d stray bytes at a message boundary",
                                  length(b4))))
  if (all(b4 == as.raw(0xFF))) {
    len <- readBin(s$read_exact(4L, "a message length"), "integer", size = 4L, endian = "little")
  } else {
    len <- readBin(b4, "integer", size = 4L, endian = "little")   # pre-0.15 format
  }
  if (is.na(len) || len < 0 || len > .ai_max_metadata)
    stop(.ai_stream_error(sprintf("corrupt Arrow stream: implausible metadata length %s",
                                  if (is.na(len)) "-2147483648" else len)))
  if (len == 0) return(list(eos = TRUE))
  meta <- s$read_exact(len, "message metadata")
  root <- tryCatch({
    m <- .fb_table(meta, .ai_u32(meta, 0))
    list(version = .fb_scalar(m, 0L, .ai_i16, 0L),
         header_type = .fb_scalar(m, 1L, .ai_u8, 0L),
         header = .fb_subtable(m, 2L),
         body_length = .fb_scalar(m, 3L, .ai_i64, 0),
         ascii = .ai_ascii_columns(m))
  }, error = function(e) {
    if (inherits(e, "arrow_stream_error")) stop(e)
    stop(.ai_stream_error(paste0("corrupt Arrow message metadata: ", conditionMessage(e))))
  })
  if (is.na(root$body_length) || root$body_length < 0 || root$body_length > .ai_max_body)
    stop(.ai_stream_error(sprintf("corrupt Arrow stream: implausible body length %.0f",
                                  root$body_length)))
  if (root$version < 3L)
    stop(.ai_stream_error(sprintf(
      "Arrow metadata version V%d (before Arrow 0.8) is not supported", root$version + 1L)))
  if (!(root$header_type %in% 1:5) || is.null(root$header))
    stop(.ai_stream_error(sprintf("corrupt Arrow stream: message header type %d",
                                  root$header_type)))
  root$eos <- FALSE
  root$buffers <- NULL
  root$buffer_error <- NULL
  # Record and dictionary batches: read the body buffer by buffer (no copy of
  # the whole body); anything else: read and drop the body.
  layout <- NULL
  if (root$header_type %in% c(2L, 3L)) {
    layout <- tryCatch({
      rb <- if (root$header_type == 3L) root$header else .fb_subtable(root$header, 1L)
      if (is.null(rb)) NULL else .fb_pair_vector(rb, 2L)
    }, error = function(e) {
      root$buffer_error <<- paste0("corrupt buffer list: ", conditionMessage(e))
      NULL
    })
  }
  blen <- root$body_length
  if (!is.null(layout)) {
    off <- layout$a
    len <- layout$b
    ok <- !anyNA(off) && !anyNA(len) && all(off >= 0) && all(len >= 0) && all(off + len <= blen)
    if (!ok) {
      bad <- which(is.na(off) | is.na(len) | off < 0 | len < 0 | off + len > blen)[1L]
      root$buffer_error <- sprintf("buffer %d (offset %.0f, length %.0f) lies outside the %.0f-byte body",
                                   bad, off[bad], len[bad], blen)
      layout <- NULL
    }
  }
  if (is.null(layout)) {
    s$skip(blen, "message body")
  } else {
    nbuf <- length(layout$a)
    bufs <- vector("list", nbuf)
    kk <- if (is.function(kinds)) tryCatch(kinds(root), error = function(e) NULL)
    kk <- c(kk, rep("raw", nbuf))[seq_len(nbuf)]
    sorted <- length(off) < 2L || (!is.unsorted(off) && all(off[-1L] >= (off + len)[-nbuf]))
    if (sorted) {
      cur <- 0
      for (k in seq_len(nbuf)) {
        if (off[k] > cur) s$skip(off[k] - cur, "message body")
        if (len[k] > 0) bufs[[k]] <- s$read_buffer(len[k], kk[k])
        cur <- off[k] + len[k]
      }
      if (blen > cur) s$skip(blen - cur, "message body")
    } else {
      body <- s$read_exact(blen, "message body")
      bcon <- rawConnection(body, "rb")
      on.exit(close(bcon))
      for (k in seq_len(nbuf)) if (len[k] > 0) {
        seek(bcon, off[k])
        bufs[[k]] <- .ai_read_buffer(bcon, len[k], kk[k])
      }
    }
    root$buffers <- bufs
  }
  root
}

# The 0-based positions of the string columns whose bytes are all ASCII, as
# a message's custom metadata lists them under .ai_ascii_key (the Worker's
# task/dictionary.py, ascii_columns), else integer(0): R then need not check
# those strings for UTF-8 and mark them.  (The sender is trusted with this:
# a wrong list leaves non-ASCII strings unchecked and in the native encoding.)
.ai_ascii_key <- "workerbridge.ascii"
.ai_ascii_columns <- function(m) {
  kvs <- .fb_table_vector(m, 4L)
  for (kv in kvs) if (identical(.fb_string(kv, 0L), .ai_ascii_key)) {
    v <- .fb_string(kv, 1L)
    return(if (is.na(v) || !nzchar(v)) integer(0)
           else suppressWarnings(as.integer(strsplit(v, ",", fixed = TRUE)[[1L]])))
  }
  integer(0)
}

# ---------------------------------------------------------------------------
# Decoding of one record batch

.ai_decode_valid <- function(bits, n, null_count) {
  if (is.null(bits) || null_count == 0 || n == 0) return(NULL)
  if (length(bits) * 8 < n) stop("validity bitmap too short")
  v <- as.logical(rawToBits(bits))
  if (length(v) > n) length(v) <- n
  v
}

.ai_empty_base <- function(f, opts) {
  t <- f$type
  if (!is.null(f$dict)) return(.ai_empty_base(list(type = t, dict = NULL), opts))
  switch(t$kind,
         Null = , Bool = logical(0),
         Int = if (t$bitWidth <= 16L || (t$bitWidth == 32L && t$signed)) integer(0)
               else if (t$bitWidth == 64L && opts$int64 == "character") character(0)
               else numeric(0),
         Utf8 = , LargeUtf8 = character(0),
         Binary = , LargeBinary = list(),
         numeric(0))
}

# the validity-aware decoding of one array's value buffers: a dictionary
# column, or one function per type family below
.ai_decode_values <- function(f, n, null_count, bufs, name, opts, state) {
  t <- f$type
  valid <- .ai_decode_valid(bufs[[1L]], n, null_count)
  if (!is.null(f$dict)) return(.ai_decode_dict_indices(f$dict, n, bufs, valid, name, state))
  switch(t$kind,
    Null = rep(NA, n),
    Bool = {
      vb <- .ai_need(bufs[[2L]], ceiling(n / 8), "values", name)
      .ai_setna(if (n) as.logical(rawToBits(vb)[seq_len(n)]) else logical(0), valid)
    },
    Int = if (t$bitWidth != 64L) .ai_decode_int(t, n, bufs, valid, name, state)
          else .ai_decode_int64(t, n, bufs, valid, name, opts, state),
    FloatingPoint = {
      size <- if (t$precision == 1L) 4L else 8L
      vb <- .ai_need(bufs[[2L]], n * size, "values", name)
      x <- .ai_values(vb, n, "double", size)
      # a valid value with the bits of R's NA reads as NA (noted: see .ai_ref_kind)
      if (anyNA(x) && any(is.na(x) & !is.nan(x) & (if (is.null(valid)) TRUE else valid)))
        state$na_bits[[name]] <- TRUE
      .ai_setna(x, valid)
    },
    Utf8 = , LargeUtf8 = {
      offs <- .ai_read_offsets(bufs[[2L]], n, t$kind == "LargeUtf8", name)
      if (isTRUE(opts$defer)) .ai_string_bytes(bufs[[3L]], offs, n, valid, name, isTRUE(opts$ascii))
      else .ai_decode_strings(bufs[[3L]], offs, n, valid, name, ascii = isTRUE(opts$ascii))
    },
    Binary = , LargeBinary = .ai_decode_binary(t, n, bufs, valid, name),
    Date = , Timestamp = .ai_decode_temporal(t, n, bufs, valid, name),
    Decimal = .ai_decode_decimal(t, n, bufs, valid, name, state),
    .ai_col_error(name, sprintf("Arrow type %s is not supported", t$name)))
}

# a value buffer of at least `bytes` bytes (raw(0) for a missing one), or the
# column's error
.ai_need <- function(buf, bytes, what, name) {
  if (is.null(buf)) buf <- raw(0)
  if (.ai_nbytes(buf) < bytes)
    .ai_col_error(name, sprintf("%s buffer holds %.0f bytes, %.0f needed", what, .ai_nbytes(buf), bytes))
  buf
}

.ai_setna <- function(x, valid) { if (!is.null(valid)) x[!valid] <- NA; x }

# a dictionary column: its indices point at the values of the dictionary batch
# with its id (sent earlier in the stream)
.ai_decode_dict_indices <- function(d, n, bufs, valid, name, state) {
  ib <- .ai_need(bufs[[2L]], n * d$bitWidth / 8, "dictionary index", name)
  idx <- .ai_setna(.ai_read_ints(ib, n, d$bitWidth, d$signed), valid)
  values <- state$dicts[[as.character(d$id)]]
  if (is.null(values))
    .ai_col_error(name, sprintf("no dictionary with id %.0f was sent before the record batch", d$id))
  # one pass for the range (no logical vectors of n); the strings are made
  # once per dictionary entry, the rows only point at them
  r <- if (n) suppressWarnings(c(min(idx, na.rm = TRUE), max(idx, na.rm = TRUE)))  # all NA: Inf, -Inf
       else c(0, 0)
  if (is.finite(r[1L]) && (r[1L] < 0 || r[2L] >= length(values)))
    .ai_col_error(name, "dictionary index out of range")
  values[if (is.integer(idx)) idx + 1L else idx + 1]
}

# 8, 16, 32 bit integers (unsigned 32 as double)
.ai_decode_int <- function(t, n, bufs, valid, name, state) {
  vb <- .ai_need(bufs[[2L]], n * t$bitWidth / 8, "values", name)
  x <- .ai_read_ints(vb, n, t$bitWidth, t$signed)
  # R's NA_integer_ is the int32 minimum: a valid -2147483648 reads as NA
  if (t$bitWidth == 32L && t$signed && anyNA(x) && (is.null(valid) || any(is.na(x) & valid)))
    state$warn[[name]] <- "%s value -2147483648 (the int32 minimum) is NA in R"
  .ai_setna(x, valid)
}

# 64 bit integers: exact decimal text (int64 = "character") or double, with a
# warning noted when a value beyond 2^53 lost precision
.ai_decode_int64 <- function(t, n, bufs, valid, name, opts, state) {
  vb <- .ai_need(bufs[[2L]], n * t$bitWidth / 8, "values", name)
  if (opts$int64 == "character")
    return(.ai_setna(.ai_i64_to_character(.ai_i64_halves(vb, n, t$signed), t$signed), valid))
  x <- .ai_i64_vec(vb, n, t$signed)
  # |x| >= 2^53 holds every value beyond 2^53 (x is rounded); the exact
  # test on the halves, only for those: v > 2^53 or v < -2^53
  # (range first: no scan allocates when all values are small)
  r <- if (n) suppressWarnings(c(min(x, na.rm = TRUE), max(x, na.rm = TRUE)))   # all NA: Inf, -Inf
       else c(0, 0)
  cand <- if (n && (r[1L] <= -9007199254740992 || r[2L] >= 9007199254740992))
            which(abs(x) >= 9007199254740992) else integer(0)
  if (!is.null(valid)) cand <- cand[valid[cand]]
  if (length(cand)) {
    h <- .ai_i64_halves(if (is.double(vb)) vb[cand] else vb[rep(8 * (cand - 1), each = 8L) + 1:8],
                        length(cand), t$signed)
    if (any(h$hi > 2097152 | (h$hi == 2097152 & h$lo > 0) | h$hi < -2097152))
      state$warn[[name]] <- paste0("%s values beyond 2^53 lost precision when converted ",
                                   "to double (use int64 = \"character\" for exact values)")
  }
  .ai_setna(x, valid)
}

# Binary and LargeBinary: a list of raw vectors (NULL for a null)
.ai_decode_binary <- function(t, n, bufs, valid, name) {
  offs <- .ai_read_offsets(bufs[[2L]], n, t$kind == "LargeBinary", name)
  data <- bufs[[3L]]
  if (n == 0L) return(list())
  if (anyNA(offs) || offs[n + 1L] > length(data) || offs[1L] < 0 || is.unsorted(offs))
    .ai_col_error(name, "binary offsets out of range")
  lens <- diff(offs)
  region <- if (offs[n + 1L] > offs[1L]) data[(offs[1L] + 1):offs[n + 1L]] else raw(0)
  grp <- structure(rep.int(seq_len(n), lens), levels = as.character(seq_len(n)), class = "factor")
  out <- split.default(region, grp)
  names(out) <- NULL
  if (!is.null(valid)) out[!valid] <- list(NULL)
  out
}

# Date (days since the epoch) and Timestamp (seconds since the epoch), as
# doubles; the classes are set by .ai_finish_column
.ai_decode_temporal <- function(t, n, bufs, valid, name) {
  if (t$kind == "Date") {
    if (t$unit == 0L) {
      vb <- .ai_need(bufs[[2L]], n * 4, "values", name)
      x <- as.numeric(.ai_values(vb, n, "integer", 4L))
    } else {
      vb <- .ai_need(bufs[[2L]], n * 8, "values", name)
      x <- .ai_i64_vec(vb, n) / 86400000
    }
    return(.ai_setna(x, valid))
  }
  vb <- .ai_need(bufs[[2L]], n * 8, "values", name)
  x <- switch(t$unit + 1L,
              .ai_i64_vec(vb, n),
              .ai_i64_vec(vb, n) / 1e3,
              .ai_i64_vec(vb, n) / 1e6,
              {
                dm <- .ai_i64_divmod(.ai_i64_halves(vb, n, TRUE), 1e9, TRUE)
                s <- dm$q + dm$r / 1e9
                ifelse(dm$neg, -s, s)
              })
  .ai_setna(x, valid)
}

.ai_decode_decimal <- function(t, n, bufs, valid, name, state) {
  nb <- t$bitWidth / 8
  vb <- .ai_need(bufs[[2L]], n * nb, "values", name)
  x <- .ai_decimal_to_double(vb, n, nb / 2, t$scale)
  # exact while the unscaled value fits a double's 53 bits
  if (n && any(abs(x) * 10^t$scale > 9007199254740992 & (if (is.null(valid)) TRUE else valid),
               na.rm = TRUE))
    state$warn[[name]] <- "%s values of more than 15 significant digits lost precision as double"
  .ai_setna(x, valid)
}

.ai_read_ints <- function(vb, n, bw, signed) {
  if (bw == 64L) return(.ai_i64_vec(vb, n, signed))
  if (is.integer(vb)) return(.ai_first(vb, n))        # int32, read as such
  if (bw == 32L && !signed) {
    x <- as.numeric(readBin(vb, "integer", n = n, size = 4L, endian = "little"))
    x[is.na(x)] <- 2147483648
    return(x + (x < 0) * 4294967296)
  }
  readBin(vb, "integer", n = n, size = bw / 8L, signed = signed || bw == 32L, endian = "little")
}

.ai_read_offsets <- function(ob, n, large, name) {
  size <- if (large) 8L else 4L
  if (n == 0L) return(0)
  if (is.null(ob) || .ai_nbytes(ob) < (n + 1) * size)
    .ai_col_error(name, sprintf("offsets buffer holds %.0f bytes, %.0f needed",
                                if (is.null(ob)) 0 else .ai_nbytes(ob), (n + 1) * size))
  if (large) .ai_i64_vec(ob, n + 1L)
  else .ai_values(ob, n + 1L, "integer", 4L)
}

.ai_max_chunk <- 1073741824   # bytes per rawToChar call

.ai_check_string_offsets <- function(data, offs, n, name)
  if (anyNA(offs) || offs[1L] < 0 || offs[n + 1L] > length(data) || is.unsorted(offs))
    .ai_col_error(name, "string offsets out of range")

# (ascii: the sender says every byte is ASCII; no UTF-8 check or marking)
.ai_decode_strings <- function(data, offs, n, valid, name, checked = FALSE, ascii = FALSE) {
  if (n == 0L) return(character(0))
  if (!checked) .ai_check_string_offsets(data, offs, n, name)
  total <- offs[n + 1L] - offs[1L]
  if (total > .ai_max_chunk) {
    # decode in row chunks of at most .ai_max_chunk bytes each
    grp <- floor((offs[-1L] - offs[1L] - 1) / .ai_max_chunk)
    out <- character(n)
    for (g in unique(grp)) {
      rows <- which(grp == g)
      a <- rows[1L]; z <- rows[length(rows)]
      out[rows] <- .ai_decode_strings(data, offs[a:(z + 1L)], length(rows),
                                      if (is.null(valid)) NULL else valid[rows], name, TRUE, ascii)
    }
    return(out)
  }
  if (total == 0) {
    out <- character(n)
  } else if (isTRUE(l10n_info()[["UTF-8"]])) {
    # readChar makes the n strings straight from the bytes (native encoding,
    # which is UTF-8 here); non-ASCII ones are then checked and marked UTF-8
    # (readChar reads from the start of a raw vector whose size fits an int)
    region <- if (offs[1L] == 0 && length(data) <= 2147483647) data
              else data[(offs[1L] + 1):offs[n + 1L]]
    lens <- offs[2:(n + 1L)] - offs[1:n]
    if (!is.integer(lens)) lens <- as.integer(lens)
    out <- tryCatch(readChar(region, lens, useBytes = TRUE), error = function(e)
      .ai_col_error(name, "a string holds a NUL byte, which R strings cannot hold"))
    # chars < bytes exactly for non-ASCII UTF-8 (NA for invalid strings): the
    # sums are equal only when all are ASCII (not counted when the sender says so)
    nc <- if (!ascii) nchar(out, type = "chars", allowNA = TRUE)
    total_nc <- if (ascii) total else sum(nc)   # no overflow: total < 2^31 here
    rows <- if (!is.na(total_nc) && total_nc == total) integer(0)
            else which(is.na(nc) | nc != lens)
    if (length(rows)) {
      bad <- rows[!validUTF8(out[rows])]
      if (length(bad))
        .ai_col_error(name, sprintf("row %d holds invalid UTF-8", bad[1L]))
      Encoding(out[rows]) <- "UTF-8"
    }
  } else {
    region <- if (offs[1L] == 0 && offs[n + 1L] == length(data)) data
              else data[(offs[1L] + 1):offs[n + 1L]]
    big <- tryCatch(rawToChar(region), error = function(e)
      .ai_col_error(name, "a string holds a NUL byte, which R strings cannot hold"))
    Encoding(big) <- "bytes"
    rel <- offs - offs[1L]
    out <- substring(big, rel[-(n + 1L)] + 1, rel[-1L])
    hi <- if (ascii) integer(0) else which(region > as.raw(0x7F))
    if (length(hi)) {
      rows <- unique(findInterval(hi - 1, rel, left.open = FALSE))
      Encoding(out[rows]) <- "UTF-8"
      bad <- rows[!validUTF8(out[rows])]
      if (length(bad))
        .ai_col_error(name, sprintf("row %d holds invalid UTF-8", bad[1L]))
    }
  }
  if (!is.null(valid)) out[!valid] <- NA_character_
  out
}

# A string array of a stream read whole, kept as its bytes until every other
# column is bound (.ai_bind_string_bytes); its offsets are checked now, so that
# a bad batch fails where it stands.
.ai_string_bytes <- function(data, offs, n, valid, name, ascii = FALSE) {
  if (n > 0L) .ai_check_string_offsets(data, offs, n, name)
  structure(list(data = if (is.null(data)) raw(0) else data, offs = offs, n = n, valid = valid,
                 ascii = ascii),
            class = "ai_string_bytes")
}

.ai_decimal_to_double <- function(vb, n, nlimbs, scale) {
  if (n == 0L) return(numeric(0))
  m <- matrix(readBin(vb, "integer", n = n * nlimbs, size = 2L, signed = FALSE, endian = "little"),
              nrow = nlimbs)
  neg <- m[nlimbs, ] >= 32768L
  if (any(neg)) {
    w <- which(neg)
    sub <- 65535L - m[, w, drop = FALSE]
    carry <- rep(1L, length(w))
    for (i in seq_len(nlimbs)) {
      v <- sub[i, ] + carry
      carry <- as.integer(v >= 65536L)
      sub[i, ] <- v - carry * 65536L
    }
    m[, w] <- sub
  }
  acc <- numeric(n)
  for (i in nlimbs:1) acc <- acc * 65536 + m[i, ]
  acc[neg] <- -acc[neg]
  if (scale != 0) acc <- acc / 10^scale
  acc
}

# The buffer count of a field's layout (for the supported types).
.ai_nbuffers <- function(f) {
  if (!is.null(f$dict)) return(2L)
  switch(f$type$kind, Null = 0L, Utf8 = , LargeUtf8 = , Binary = , LargeBinary = 3L, 2L)
}

.ai_decode_batch <- function(rb, msg, fields, opts, state, what = "record batch") {
  if (!is.null(.fb_subtable(rb, 3L)))
    stop(.ai_codec_error("compressed Arrow IPC bodies (RecordBatch.compression) are not supported"))
  if (!is.null(msg$buffer_error)) stop(.ai_codec_error(paste0(what, ": ", msg$buffer_error)))
  length <- .fb_scalar(rb, 0L, .ai_i64, 0)
  nodes <- .fb_pair_vector(rb, 1L)
  buffers <- msg$buffers
  ni <- 0L
  bi <- 0L
  cols <- vector("list", length(fields))
  for (j in seq_along(fields)) {
    f <- fields[[j]]
    ni <- ni + 1L
    if (ni > length(nodes$a))
      stop(.ai_codec_error(sprintf("%s has %d field nodes, fewer than the schema's %d fields",
                                   what, length(nodes$a), length(fields))))
    n <- nodes$a[ni]
    nc <- nodes$b[ni]
    if (n != length)
      .ai_col_error(f$name, sprintf("array length %.0f differs from the batch length %.0f", n, length))
    nb <- .ai_nbuffers(f)
    if (bi + nb > length(buffers))
      stop(.ai_codec_error(sprintf("%s has too few buffers for its schema", what)))
    bufs <- buffers[bi + seq_len(nb)]
    if (!nb) bufs <- list(NULL)
    bi <- bi + nb
    opts$ascii <- (j - 1L) %in% msg$ascii
    cols[[j]] <- .ai_decode_values(f, n, nc, bufs, f$name, opts, state)
  }
  list(length = length, cols = cols)
}

# ---------------------------------------------------------------------------
# The reader

# A decoded column as R gives it to the user: Date/POSIXct classes, factors
# (for dictionary columns with factors = TRUE); warns (once per column and
# stream) when int64 values beyond 2^53 lost precision.
.ai_finish_column <- function(x, f, lev, opts, state) {
  kind <- f$type$kind
  if (!is.null(f$dict) && opts$factors && is.character(x)) {
    x <- factor(x, levels = if (is.null(lev)) character(0) else lev,
                ordered = isTRUE(f$dict$ordered))
  } else if (kind == "Date") {
    class(x) <- "Date"
  } else if (kind == "Timestamp") {
    tz <- f$type$tz
    if (is.na(tz) || !nzchar(tz)) tz <- "UTC"
    x <- structure(x, class = c("POSIXct", "POSIXt"), tzone = tz)
  }
  if (is.character(state$warn[[f$name]]) && !isTRUE(state$warned[[f$name]])) {
    state$warned[[f$name]] <- TRUE
    warning(sprintf(paste0("column '%s': ", state$warn[[f$name]]), f$name, f$type$name),
            call. = FALSE)
  }
  x
}

# The data.frame of finished columns `cols` (one per field) with nrows rows.
.ai_frame <- function(fields, cols, nrows, levels, opts, state) {
  for (j in seq_along(fields))
    cols[[j]] <- .ai_finish_column(cols[[j]], fields[[j]], levels[[j]], opts, state)
  names(cols) <- vapply(fields, function(f) f$name, "")
  structure(cols, class = "data.frame", row.names = .set_row_names(as.integer(nrows)))
}

# on_batch: NULL, or a function(frame) called with each record batch as a
# data.frame, in which case nothing is accumulated and the reader returns
# invisible(list(names, nrows, nbatches)).  An error raised by on_batch is
# re-raised as it is, after the rest of the stream has been consumed.
# Steps: the schema (.ai_read_schema), then message by message a record batch
# (.ai_decode_batch, kept or handed to on_batch) or a dictionary batch
# (.ai_read_dictionary), then the kept batches bound per column.
arrow_read_stream <- function(src, int64 = c("double", "character"), factors = FALSE,
                              on_batch = NULL, timing = NULL, keep = NULL) {
  int64 <- match.arg(int64)
  streaming <- is.function(on_batch)
  # defer: a stream read whole makes its strings last (.ai_bind_string_bytes)
  opts <- list(int64 = int64, factors = isTRUE(factors), defer = !streaming)
  s <- .ai_source(src, timing)
  if (s$close) on.exit(close(s$con))
  state <- .ai_reader_state()
  schema <- .ai_read_schema(s)
  fields <- schema$fields
  pending <- schema$error   # first codec error; the stream is drained before raising it
  user_error <- NULL        # an error of on_batch; likewise raised after draining
  parts <- lapply(fields, function(f) list())
  levels <- lapply(fields, function(f) NULL)
  nrows <- 0
  nbatches <- 0L
  kinds <- .ai_stream_kinds(fields)

  repeat {
    msg <- .ai_read_message(s, kinds)
    if (is.null(msg) || isTRUE(msg$eos)) break
    if (!is.null(pending) || !is.null(user_error)) next
    b <- NULL
    pending <- tryCatch({
      if (msg$header_type == 3L) {
        b <- .ai_decode_batch(msg$header, msg, fields, opts, state)
        nrows <- nrows + b$length
        nbatches <- nbatches + 1L
        if (!streaming) {
          for (j in seq_along(fields)) parts[[j]][[length(parts[[j]]) + 1L]] <- b$cols[[j]]
          b <- NULL
        }
      } else if (msg$header_type == 2L) {
        levels <- .ai_read_dictionary(msg, fields, opts, state, levels)
      } else {
        stop(.ai_codec_error(sprintf("unexpected Arrow message type %d inside a stream",
                                     msg$header_type)))
      }
      NULL
    }, arrow_codec_error = function(e) e, error = .ai_message_error)
    if (is.null(b) || !is.null(pending)) next
    msg <- NULL                                   # let the body's buffers go
    frame <- .ai_frame(fields, b$cols, b$length, levels, opts, state)
    b <- NULL
    user_error <- tryCatch({ on_batch(frame); NULL }, error = function(e) e)
    frame <- NULL
  }
  if (!is.null(pending)) stop(pending)
  if (!is.null(user_error)) stop(user_error)

  if (streaming)
    return(invisible(list(names = vapply(fields, function(f) f$name, ""), nrows = nrows,
                          nbatches = nbatches)))
  cols <- vector("list", length(fields))
  # each column's parts let go once bound; the string columns last
  strings <- vapply(parts, function(p) length(p) > 0L && inherits(p[[1L]], "ai_string_bytes"), NA)
  for (j in c(which(!strings), which(strings))) {
    p <- parts[[j]]
    parts[j] <- list(NULL)
    cols[[j]] <- if (length(p) == 0L) .ai_empty_base(fields[[j]], opts)
                 else if (strings[j]) .ai_bind_string_bytes(p, fields[[j]]$name)
                 else if (length(p) == 1L) p[[1L]]
                 else do.call(c, unname(p))
  }
  df <- .ai_frame(fields, cols, nrows, levels, opts, state)
  if (is.environment(keep))
    keep$cols <- lapply(seq_along(fields), function(j)
      list(index = j - 1L, name = fields[[j]]$name, x = df[[j]],
           kind = .ai_ref_kind(fields[[j]], state)))
  df
}

# What a column read from field f comes back as when it is named, not
# written (arrow_prepare_frame's known): "utf8", "int64", "float64", "int32",
# "bool" or "date32" where writing its R column gives those same values in
# the Arrow type it came as (up to utf8 / large_utf8 and a dictionary's
# values), else NA.  Not an int32 or float64 column in which a valid value
# read as R's NA (the int32 minimum, a double with NA's bits): R cannot tell
# it from a null, nor a column it computed from one (NA + 0L), which must go
# back null as R wrote it before.
.ai_ref_kind <- function(f, state) {
  t <- f$type
  if (!is.null(state$warn[[f$name]]) && t$kind == "Int" && t$bitWidth == 32L) return(NA_character_)
  if (isTRUE(state$na_bits[[f$name]])) return(NA_character_)
  switch(t$kind,
    Utf8 = , LargeUtf8 = "utf8",
    Bool = "bool",
    Int = if (!isTRUE(t$signed)) NA_character_
          else if (t$bitWidth == 32L) "int32" else if (t$bitWidth == 64L) "int64" else NA_character_,
    FloatingPoint = if (t$precision == 2L) "float64" else NA_character_,
    Date = if (t$unit == 0L) "date32" else NA_character_,
    NA_character_)
}

# The character column of the string pieces p (.ai_string_bytes, one per
# batch), made by one readChar over their bytes put end to end (pieces of more
# than .ai_max_chunk bytes in all: piece by piece).  Why last and at once: R
# collects garbage when its heaps fill, and every collection visits every
# string alive and every entry of R's global string cache.  Strings made batch
# by batch lived through the collections of all the batches after them (a
# 2.5M-row read: 1.05 s, 0.6 s of it collecting); made at the end, after room
# is made for them (.ai_make_room) in a child whose node heap holds them (the
# Worker's r_heap_args), they meet none (0.5-0.6 s; tests/test_r_strings_last.py).
.ai_bind_string_bytes <- function(p, name) {
  a <- vapply(p, function(q) as.numeric(q$offs[1L]), 0)
  z <- vapply(p, function(q) as.numeric(q$offs[q$n + 1L]), 0)
  n <- sum(vapply(p, function(q) as.numeric(q$n), 0))
  if (sum(z - a) > .ai_max_chunk)
    return(do.call(c, lapply(p, function(q) .ai_decode_strings(q$data, q$offs, q$n, q$valid, name,
                                                               TRUE, q$ascii))))
  ascii <- all(vapply(p, function(q) q$ascii, NA))
  base <- cumsum(c(0, z - a))
  data <- do.call(c, lapply(seq_along(p), function(i) .ai_byte_range(p[[i]]$data, a[i], z[i])))
  offs <- c(0L, unlist(lapply(seq_along(p), function(i) {
    o <- p[[i]]$offs
    if (p[[i]]$n == 0L) integer(0)
    else if (!is.integer(o)) as.integer(o[-1L] - (a[i] - base[i]))
    else if (a[i] == base[i]) o[-1L]
    else o[-1L] + as.integer(base[i] - a[i])
  }), use.names = FALSE))
  valid <- if (all(vapply(p, function(q) is.null(q$valid), NA))) NULL
           else unlist(lapply(p, function(q) if (is.null(q$valid)) rep(TRUE, q$n) else q$valid),
                       use.names = FALSE)
  p <- NULL
  .ai_make_room(n, length(data))
  .ai_decode_strings(data, offs, n, valid, name, TRUE, ascii)
}

# Room in R's vector heap for n strings of `bytes` bytes in all (the column,
# the strings, the reader's two integer vectors of n), made while a collection
# is cheap: R collects when an allocation finds its heap full, and a
# collection while the strings are being made visits every one made so far.
# gc() (a full collection: cheap before the strings exist) tells the heap's
# size and use.  When the room is short, one allocation larger than it (never
# written: no memory is touched) makes R collect and size its heap to hold it
# (R sets its heap to what it holds, then adds a fifth), and a second gc()
# lets it go.  Below .ai_room_min_strings they cost more than they save: each
# full collection walks R's string cache, whose table never shrinks (500k
# rows, bench/worker_loop.py --pause 0.6: 126-144 ms a task without them,
# 157-196 ms with, though the first gc() keeps the peak at 184 MB, not 195).
# Room for the strings' nodes cannot be made from R code: the child starts
# with enough (r_heap_args in worker.py).
.ai_make_room <- function(n, bytes) {
  if (n < .ai_room_min_strings) return(invisible())
  need <- 1.1 * (bytes + 32 * n) + 8388608
  g <- gc(FALSE)
  used <- g[2L, 1L] * 8
  size <- g[2L, 3L] * 8
  if (size - used >= need) return(invisible())
  target <- used + need
  if (used < 0.3 * target) target <- target / 0.8   # R shrinks a heap less than 30% full
  rc <- rawConnection(raw(0))
  on.exit(close(rc))
  # (a heap R may not grow, R_MAX_VSIZE: the strings meet what they meet)
  tryCatch(readBin(rc, "raw", n = max(target / 1.2 - used, size - used + 8)),
           error = function(e) NULL)
  invisible(gc(FALSE))
}
.ai_room_min_strings <- 1048576

# bytes a + 1 to z of the raw vector d (no copy when that is all of it)
.ai_byte_range <- function(d, a, z) {
  if (z <= a) raw(0)
  else if (a == 0 && length(d) == z) d
  else if (a == 0) { length(d) <- z; d }
  else d[(a + 1):z]
}

# kinds(root) for .ai_read_message: the buffer kinds of a record batch, or of
# a dictionary batch's values (NULL: all raw)
.ai_stream_kinds <- function(fields) {
  batch <- tryCatch(unlist(lapply(fields, .ai_field_kinds), use.names = FALSE),
                    error = function(e) NULL)
  function(root) {
    if (root$header_type == 3L) return(batch)
    id <- .fb_scalar(root$header, 0L, .ai_i64, 0)
    j <- .ai_dict_fields(fields, id)
    if (length(j)) .ai_field_kinds(list(name = "", type = fields[[j[1L]]]$type, dict = NULL))
  }
}

# the positions of the fields encoded with dictionary `id`
.ai_dict_fields <- function(fields, id)
  which(vapply(fields, function(f) !is.null(f$dict) && f$dict$id == id, TRUE))

# What the reader keeps across a stream's messages: the dictionaries by id,
# and the precision warnings noted per column (warned once).
.ai_reader_state <- function() {
  state <- new.env(parent = emptyenv())
  state$dicts <- list()
  state$warn <- list()
  state$warned <- list()
  state$na_bits <- list()
  state
}

# A message other than a codec error failed to decode: framing errors go on
# as they are, anything else becomes the stream's codec error.
.ai_message_error <- function(e) {
  if (inherits(e, "arrow_stream_error")) stop(e)
  .ai_codec_error(paste0("could not decode an Arrow message: ", conditionMessage(e)))
}

# The last schema read, by its metadata bytes: a warm child reads the same
# schema task after task, and parsing it is most of a small task's read (0.7
# of 1.7 ms for 1,562 rows x 5 columns).  Only a schema that parsed cleanly is kept.
.ai_schema_cache <- new.env(parent = emptyenv())

# The stream's first message, its schema: list(fields, error), error being
# the arrow_codec_error of a schema the reader cannot decode (else NULL).
.ai_read_schema <- function(s) {
  msg <- .ai_read_message(s)
  if (is.null(msg) || isTRUE(msg$eos))
    stop(.ai_stream_error("empty Arrow stream: no schema message"))
  if (msg$header_type != 1L)
    stop(.ai_stream_error(sprintf("Arrow stream does not start with a schema (message type %d)",
                                  msg$header_type)))
  meta <- msg$header$buf
  if (identical(meta, .ai_schema_cache$meta))
    return(list(fields = .ai_schema_cache$fields, error = NULL))
  fields <- NULL
  error <- tryCatch({
    sch <- msg$header
    if (.fb_scalar(sch, 0L, .ai_i16, 0L) != 0L)
      stop(.ai_codec_error("big-endian Arrow data is not supported"))
    fields <- lapply(.fb_table_vector(sch, 1L), .ai_parse_field)
    for (f in fields) {
      if (!isTRUE(f$type$supported) || f$nchildren > 0L)
        .ai_col_error(f$name, sprintf("Arrow type %s is not supported by the R reader",
                                      .ai_field_type_name(f)))
      if (!is.null(f$dict) && !(f$dict$bitWidth %in% c(8L, 16L, 32L, 64L)))
        .ai_col_error(f$name, "unsupported dictionary index width")
    }
    NULL
  }, arrow_codec_error = function(e) e)
  if (is.null(error)) {
    .ai_schema_cache$meta <- meta
    .ai_schema_cache$fields <- fields
  }
  list(fields = fields, error = error)
}

# A dictionary batch: its values stored under its id in state$dicts (appended
# to for a delta); returns `levels` (per field) with the new values added to
# the factor levels of the fields that use it.
.ai_read_dictionary <- function(msg, fields, opts, state, levels) {
  db <- msg$header
  id <- .fb_scalar(db, 0L, .ai_i64, 0)
  delta <- .fb_bool(db, 2L)
  j <- .ai_dict_fields(fields, id)
  if (!length(j))
    stop(.ai_codec_error(sprintf("dictionary batch with id %.0f matches no field", id)))
  f <- fields[[j[1L]]]
  vf <- list(name = f$name, type = f$type, dict = NULL)
  data <- .fb_subtable(db, 1L)
  if (is.null(data)) stop(.ai_codec_error("dictionary batch without data"))
  opts$defer <- FALSE
  db <- .ai_decode_batch(data, msg, list(vf), opts, state, "dictionary batch")
  vals <- db$cols[[1L]]
  key <- as.character(id)
  if (delta && !is.null(state$dicts[[key]])) vals <- c(state$dicts[[key]], vals)
  state$dicts[[key]] <- vals
  if (opts$factors)                  # the factor levels: only wanted for factors
    for (jj in j) levels[[jj]] <- unique(c(levels[[jj]], vals[!is.na(vals)]))
  levels
}

# Consume an Arrow stream up to and including its end-of-stream marker without
# decoding it (so that a socket stays in step).  Returns the number of messages.
arrow_skip_stream <- function(src) {
  s <- .ai_source(src)
  if (s$close) on.exit(close(s$con))
  k <- 0L
  repeat {
    msg <- .ai_read_message(s)
    if (is.null(msg) || isTRUE(msg$eos)) break
    k <- k + 1L
  }
  invisible(k)
}

# ---------------------------------------------------------------------------
# The writer

# Check the columns and bring each to a canonical form:
#   list(name, kind, x, tz) with kind one of bool, int32, float64, utf8,
#   date32, timestamp, binary, int64 (doubles of class "wb_int64").
arrow_prepare_frame <- function(df, known = NULL, int64_names = NULL) {
  if (inherits(df, "arrow_prepared_frame")) return(df)
  if (!is.data.frame(df)) stop(.ai_codec_error("arrow_write_stream needs a data.frame"))
  nrow <- .row_names_info(df, 2L)
  nms <- names(df)
  if (is.null(nms)) nms <- rep("", length(df))
  nms[is.na(nms)] <- "NA"
  cols <- vector("list", length(df))
  refs <- list()
  for (j in seq_along(df)) {
    x <- df[[j]]
    name <- nms[j]
    if (inherits(x, "AsIs")) class(x) <- setdiff(class(x), "AsIs")
    if (length(x) != nrow && !is.null(dim(x)))
      .ai_col_error(name, sprintf("a %s column with dimensions cannot be written to Arrow",
                                  paste(class(x), collapse = "/")))
    if (length(x) != nrow)
      .ai_col_error(name, sprintf("has %d values for %d rows", length(x), nrow))
    cls <- class(x)
    ref <- if (nrow > 0L) .ai_known_column(x, name, known, int64_names)
    if (!is.null(ref)) refs[[as.character(j - 1L)]] <- ref
    col <- if (!is.null(ref)) {
      list(kind = "ref")
    } else if (inherits(x, "wb_int64")) {
      # integral doubles to be written as int64 (used for workerbridge's own columns)
      v <- as.numeric(unclass(x))
      r <- if (length(v)) suppressWarnings(range(v, na.rm = TRUE)) else c(0, 0)  # all NA: Inf, -Inf
      i32 <- if (r[1L] > -2147483648 && r[2L] < 2147483648) as.integer(v)
      if (if (is.null(i32)) any(v != round(v) | abs(v) > 9007199254740992, na.rm = TRUE)
          else any(i32 != v, na.rm = TRUE))
        .ai_col_error(name, "a wb_int64 column holds values that are not integers within 2^53")
      # i32: the values as R integers when they fit, written as 8-byte integers
      # (writeBin widens them; no arithmetic on subnormal doubles)
      list(kind = "int64", x = v, i32 = i32)
    } else if (is.factor(x)) {
      levs <- enc2utf8(as.character(levels(x)))
      codes <- as.vector(unclass(x))
      attributes(codes) <- NULL
      if (anyNA(levs) || sum(as.numeric(nchar(levs, type = "bytes"))) > .ai_max_offset)
        list(kind = "utf8", x = levs[codes])
      else list(kind = "dict", x = codes, dict = levs)
    } else if (inherits(x, "Date")) {
      list(kind = "date32", x = floor(as.numeric(unclass(x))))
    } else if (inherits(x, "POSIXct")) {
      tz <- attr(x, "tzone")
      if (is.null(tz) || !length(tz) || is.na(tz[1L]) || !nzchar(tz[1L])) tz <- "UTC"
      list(kind = "timestamp", x = as.numeric(unclass(x)), tz = tz[1L])
    } else if (!is.null(attr(x, "class")) && !(is.list(x) && identical(cls, "list"))) {
      .ai_col_error(name, sprintf("a column of class '%s' cannot be written to Arrow",
                                  paste(cls, collapse = "/")))
    } else if (!is.null(dim(x))) {
      .ai_col_error(name, "a matrix column cannot be written to Arrow")
    } else if (is.logical(x)) {
      list(kind = "bool", x = as.vector(x))
    } else if (is.integer(x)) {
      list(kind = "int32", x = as.vector(x))
    } else if (is.double(x)) {
      list(kind = "float64", x = as.vector(x))
    } else if (is.character(x)) {
      .ai_string_column(enc2utf8(as.vector(x)))
    } else if (is.list(x)) {
      isnull <- vapply(x, is.null, NA)
      ok <- isnull | vapply(x, is.raw, NA)
      if (!all(ok))
        .ai_col_error(name, sprintf(paste0("a list column can be written only when every element ",
                                           "is a raw vector or NULL (row %d is a %s)"),
                                    which(!ok)[1L], class(x[[which(!ok)[1L]]])[1L]))
      list(kind = "binary", x = x, isnull = isnull)
    } else {
      .ai_col_error(name, sprintf("a column of type '%s' cannot be written to Arrow", typeof(x)))
    }
    if (col$kind == "date32" && any(abs(col$x) > 2147483647, na.rm = TRUE))
      .ai_col_error(name, "a date lies outside the range of date32")
    if (col$kind == "timestamp" && any(abs(col$x) > 9.2e12, na.rm = TRUE))
      .ai_col_error(name, "a time lies outside the range of timestamp[us]")
    col$name <- name
    cols[[j]] <- col
  }
  structure(list(cols = cols, nrow = nrow, refs = refs), class = "arrow_prepared_frame")
}

# The 0-based position of the kept column (known: keep$cols of a read) that
# the column x is, bit for bit (doubles: -0 is not 0) and with its
# attributes, when it comes back unchanged from that position (one of the
# same name first), else NULL.  identical() compares by address first: a
# column left as read costs nothing, a changed one stops at its first difference.
.ai_known_column <- function(x, name, known, int64_names) {
  if (!length(known)) return(NULL)
  same <- vapply(known, function(k) identical(k$name, name), NA)
  for (k in c(known[same], known[!same])) {
    if (is.na(k$kind) || (k$kind == "int64" && !(name %in% int64_names))) next
    if (identical(k$x, x, num.eq = FALSE)) return(k$index)
  }
  NULL
}

# Repeated strings are written dictionary-encoded: the reader (pyarrow in the
# Worker) then gets each distinct string once.  The rule is the Worker's
# (workerbridge/dictionary.py): the distinct count of the first
# .ai_sample_rows values, scaled up by the birthday bound, at most
# .ai_max_distinct_fraction of the rows.
.ai_sample_rows <- 4096L
.ai_max_distinct_fraction <- 0.5
.ai_repeats <- function(x) {
  n <- length(x)
  if (n < 2L) return(FALSE)
  s <- x[seq_len(min(n, .ai_sample_rows))]
  if (anyNA(s)) s <- s[!is.na(s)]
  m <- length(s)
  d <- length(unique(s))
  if (m - d <= 0) return(FALSE)
  k <- if (d < m / 2) d else m * m / (2 * (m - d))
  k <= .ai_max_distinct_fraction * n
}
# A character column (UTF-8) for the writer: list(kind = "dict", x = <codes,
# 1-based>, dict = <distinct strings>) when it repeats, else kind "utf8".
.ai_string_column <- function(x) {
  if (!.ai_repeats(x)) return(list(kind = "utf8", x = x))
  u <- unique(x)
  if (anyNA(u)) u <- u[!is.na(u)]
  if (sum(as.numeric(nchar(u, type = "bytes"))) > .ai_max_offset) return(list(kind = "utf8", x = x))
  list(kind = "dict", x = match(x, u), dict = u)
}

# The UTF-8 bytes of x (no NA), concatenated.  writeBin is twice as fast as
# paste, but writes strings in the native encoding: use it only when that is UTF-8.
# The bytes of the strings x (UTF-8, no NA; lens = their byte counts) back to
# back.  All ASCII (as many characters as bytes): writeChar, one allocation.
# (Not otherwise: in a UTF-8 locale writeChar counts nchars in characters when
# it sizes a raw result, and overruns it for multibyte strings.)  Else writeBin
# with the terminators dropped -- twice as fast as paste, but it writes strings
# in the native encoding: only when that is UTF-8.
.ai_concat_strings <- function(x, lens = nchar(x, type = "bytes"), total = sum(as.numeric(lens))) {
  nc <- tryCatch(sum(nchar(x, type = "chars", allowNA = TRUE)), error = function(e) NA)
  if (!is.na(nc) && nc == total)
    return(writeChar(x, raw(), nchars = lens, eos = NULL, useBytes = TRUE))
  if (isTRUE(l10n_info()[["UTF-8"]])) {
    r <- writeBin(x, raw())
    r[r != as.raw(0L)]
  } else {
    charToRaw(paste(x, collapse = ""))
  }
}

.ai_bitmap <- function(bits) {
  n <- length(bits)
  pad <- (8L - n %% 8L) %% 8L
  packBits(c(bits, logical(pad)), "raw")
}

.ai_type_table <- function(kind, tz = NULL) {
  switch(kind,
    ref = list(1L, .fbb_table()),                # Null
    bool = list(6L, .fbb_table()),
    int32 = list(2L, .fbb_table(.fbb_field(0L, "i32", 32L), .fbb_field(1L, "bool", 1L))),
    int64 = list(2L, .fbb_table(.fbb_field(0L, "i32", 64L), .fbb_field(1L, "bool", 1L))),
    float64 = list(3L, .fbb_table(.fbb_field(0L, "i16", 2L))),
    utf8 = , dict = list(5L, .fbb_table()),
    binary = list(4L, .fbb_table()),
    date32 = list(8L, .fbb_table(.fbb_field(0L, "i16", 0L))),
    timestamp = list(10L, .fbb_table(.fbb_field(0L, "i16", 2L),
                                     .fbb_field(1L, "off", .fbb_string(tz)))))
}

.ai_message <- function(header_type, header, body_length) {
  meta <- .fbb_build(.fbb_table(
    .fbb_field(0L, "i16", 4L),                 # MetadataVersion V5
    .fbb_field(1L, "u8", header_type),
    .fbb_field(2L, "off", header),
    .fbb_field(3L, "i64", body_length)))
  # metadata is padded to 8 so that the body starts 8-aligned (8-byte prefix)
  c(as.raw(c(0xFF, 0xFF, 0xFF, 0xFF)),
    writeBin(length(meta), raw(), size = 4L, endian = "little"), meta)
}

# The schema message of a prepared frame: the same columns give the same
# bytes, kept (a warm child writes one schema per task, and building it in R
# took ~40% of a small task's time)
.ai_schema_cache <- new.env(parent = emptyenv())
.ai_schema_message <- function(prep) {
  key <- paste0("k", paste(vapply(prep$cols, function(col)
    paste(nchar(col$name, type = "bytes"), enc2utf8(col$name), col$kind,
          if (is.null(col$tz)) "" else col$tz, sep = "\r"), ""), collapse = "\n"))
  hit <- .ai_schema_cache[[key]]
  if (!is.null(hit)) return(hit)
  if (length(.ai_schema_cache) >= 64L) rm(list = ls(.ai_schema_cache, all.names = TRUE), envir = .ai_schema_cache)
  .ai_schema_cache[[key]] <- .ai_build_schema_message(prep)
}

.ai_build_schema_message <- function(prep) {
  fields <- lapply(seq_along(prep$cols), function(j) {
    col <- prep$cols[[j]]
    tt <- .ai_type_table(col$kind, col$tz)
    # a dictionary column: utf8 values, int32 indices, dictionary id j - 1
    enc <- if (col$kind == "dict")
      list(.fbb_field(4L, "off", .fbb_table(
        .fbb_field(0L, "i64", j - 1L),
        .fbb_field(1L, "off", .fbb_table(.fbb_field(0L, "i32", 32L), .fbb_field(1L, "bool", 1L))),
        .fbb_field(2L, "bool", 0L))))
    do.call(.fbb_table, c(list(.fbb_field(0L, "off", .fbb_string(col$name)),
                               .fbb_field(1L, "bool", 1L),
                               .fbb_field(2L, "u8", tt[[1L]]),
                               .fbb_field(3L, "off", tt[[2L]])),
                          enc, list(.fbb_field(5L, "off", .fbb_tables(list())))))
  })
  schema <- .fbb_table(.fbb_field(0L, "i16", 0L),
                       .fbb_field(1L, "off", .fbb_tables(fields)))
  .ai_message(1L, schema, 0)
}

# Encode rows `rows` (or all) of the prepared columns into one record batch message.
.ai_batch_message <- function(prep, rows, n) {
  p <- .ai_batch_parts(prep, rows, n)
  list(meta = .ai_batch_meta(p), body = p$body)
}

# The dictionary batch messages of a prepared frame's dictionary columns
# (each replaces the stream's dictionary of that id; ids as in the schema).
.ai_dict_messages <- function(prep) {
  out <- list()
  for (j in seq_along(prep$cols)) {
    col <- prep$cols[[j]]
    if (col$kind != "dict") next
    values <- list(cols = list(list(kind = "utf8", x = col$dict, name = col$name)))
    p <- .ai_batch_parts(values, NULL, length(col$dict))
    db <- .fbb_table(.fbb_field(0L, "i64", j - 1L), .fbb_field(1L, "off", .ai_record_batch_table(p)),
                     .fbb_field(2L, "bool", 0L))
    out[[length(out) + 1L]] <- list(meta = .ai_message(2L, db, p$length), body = p$body)
  }
  out
}

# The RecordBatch table, body pieces (raw or ai_vec) and body length of rows
# `rows` (or all).
.ai_batch_parts <- function(prep, rows, n) {
  pieces <- list()
  boffs <- numeric(0)
  blens <- numeric(0)
  nlen <- numeric(0)
  nnull <- numeric(0)
  pos <- 0
  add <- function(...) {             # one buffer, of one or more pieces
    parts <- list(...)
    len <- sum(vapply(parts, .ai_piece_len, 0))
    boffs[length(boffs) + 1L] <<- pos
    blens[length(blens) + 1L] <<- len
    if (len) {
      for (p in parts) if (.ai_piece_len(p)) pieces[[length(pieces) + 1L]] <<- p
      pad <- (8L - len %% 8L) %% 8L
      if (pad) pieces[[length(pieces) + 1L]] <<- raw(pad)
      pos <<- pos + len + pad
    }
  }
  for (col in prep$cols) {
    if (col$kind == "ref") {           # type Null: a field node, no buffers
      nlen[length(nlen) + 1L] <- n
      nnull[length(nnull) + 1L] <- n
      next
    }
    x <- if (is.null(rows)) col$x else col$x[rows]
    # na: the null slots, or NULL when there are none (NaN is a value, not a null)
    na <- if (col$kind == "binary") (if (is.null(rows)) col$isnull else col$isnull[rows])
          else if (!anyNA(x)) NULL
          else if (col$kind == "float64") is.na(x) & !is.nan(x)
          else is.na(x)
    nc <- if (is.null(na)) 0 else sum(na)
    nlen[length(nlen) + 1L] <- n
    nnull[length(nnull) + 1L] <- nc
    add(if (nc > 0) .ai_bitmap(!na) else raw(0))
    switch(col$kind,
      bool = { if (nc) x[na] <- FALSE; add(.ai_bitmap(x)) },
      int32 = add(.ai_vec(x, 4L)),
      dict = { if (nc) x[na] <- 1L; add(.ai_vec(x - 1L, 4L)) },
      int64 = add(if (is.null(col$i32)) .ai_int64_piece(x)
                  else .ai_vec(if (is.null(rows)) col$i32 else col$i32[rows], 8L)),
      float64 = add(.ai_vec(x, 8L)),
      date32 = { if (nc) x[na] <- 0; add(.ai_vec(as.integer(x), 4L)) },
      timestamp = add(.ai_int64_piece(round(x * 1e6))),
      utf8 = {
        if (nc) x[na] <- ""
        lens <- nchar(x, type = "bytes")
        # integer sums: an overflow (NA) means more than 2^31 - 1 bytes
        ends <- suppressWarnings(cumsum(lens))
        if (n && (is.na(ends[n]) || ends[n] > .ai_max_offset)) .ai_batch_too_big(col$name, n)
        total <- if (n) ends[n] else 0L
        add(.ai_vec(0L, 4L), .ai_vec(ends, 4L))
        add(if (total > 0) .ai_concat_strings(x, lens, total) else raw(0))
      },
      binary = {
        lens <- lengths(x)
        ends <- cumsum(as.numeric(lens))
        total <- if (n) ends[n] else 0
        if (total > .ai_max_offset) .ai_batch_too_big(col$name, n)
        add(.ai_vec(0L, 4L), .ai_vec(as.integer(ends), 4L))
        add(if (total > 0) unlist(x, use.names = FALSE) else raw(0))
      })
  }
  struct_bytes <- function(a, b) if (length(a)) .ai_int64_bytes(as.vector(rbind(a, b))) else raw(0)
  list(nodes = struct_bytes(nlen, nnull), buffers = struct_bytes(boffs, blens), rows = n,
       body = pieces, length = pos)
}

# The RecordBatch table of .ai_batch_parts' `p`.
.ai_record_batch_table <- function(p)
  .fbb_table(.fbb_field(0L, "i64", p$rows),
             .fbb_field(1L, "off", .fbb_structs(p$nodes, length(p$nodes) %/% 16L)),
             .fbb_field(2L, "off", .fbb_structs(p$buffers, length(p$buffers) %/% 16L)))

# The metadata of a record batch message.  The builder writes every field, so
# its layout depends only on the numbers of field nodes and buffers: it is
# built once for each, and then the batch's values are written in place, at
# the positions where the reader finds them (building it took ~0.5 ms a batch).
.ai_batch_layouts <- new.env(parent = emptyenv())
.ai_batch_meta <- function(p) {
  key <- sprintf("n%d_b%d", length(p$nodes), length(p$buffers))
  lay <- .ai_batch_layouts[[key]]
  if (is.null(lay)) {
    if (length(.ai_batch_layouts) >= 64L)
      rm(list = ls(.ai_batch_layouts, all.names = TRUE), envir = .ai_batch_layouts)
    lay <- .ai_batch_layouts[[key]] <- .ai_batch_layout(length(p$nodes), length(p$buffers))
  }
  meta <- lay$meta
  meta[lay$rows + 1:8] <- .ai_int64_bytes(p$rows)
  meta[lay$body + 1:8] <- .ai_int64_bytes(p$length)
  if (length(p$nodes)) meta[lay$nodes + seq_along(p$nodes)] <- p$nodes
  if (length(p$buffers)) meta[lay$buffers + seq_along(p$buffers)] <- p$buffers
  meta
}
# A record batch message's metadata with zero values, and the 0-based
# positions of its values (after the 8-byte prefix), found by the reader.
.ai_batch_layout <- function(node_bytes, buffer_bytes) {
  p <- list(rows = 0, nodes = raw(node_bytes), buffers = raw(buffer_bytes))
  meta <- .ai_message(3L, .ai_record_batch_table(p), 0)
  fb <- meta[-(1:8)]
  m <- .fb_table(fb, .ai_u32(fb, 0))
  rb <- .fb_subtable(m, 2L)
  list(meta = meta, rows = 8 + .fb_field_pos(rb, 0L), body = 8 + .fb_field_pos(m, 3L),
       nodes = 8 + .fb_vector(rb, 1L, 16L)$start, buffers = 8 + .fb_vector(rb, 2L, 16L)$start)
}

# Where the writer's bytes go: a connection, a function(bytes), or (con = NULL)
# a list collected into one raw vector by result().
.ai_emitter <- function(con, vectors = FALSE) {
  if (is.null(con)) {
    acc <- new.env(parent = emptyenv())
    acc$out <- list()
    return(list(emit = function(bytes) acc$out[[length(acc$out) + 1L]] <- .ai_piece_raw(bytes),
                finish = function() { r <- do.call(c, acc$out); acc$out <- list(); r }))
  }
  if (is.function(con))
    return(list(emit = if (vectors) con else function(bytes) con(.ai_piece_raw(bytes)),
                finish = function() invisible(NULL)))
  list(emit = function(bytes) .ai_write_piece(bytes, con),
       finish = function() { flush(con); invisible(NULL) })
}

.ai_kind_names <- c(bool = "logical", int32 = "integer", float64 = "double", utf8 = "character",
                    dict = "character",
                    date32 = "Date", timestamp = "POSIXct", binary = "list of raw vectors",
                    int64 = "int64")

# A prepared frame brought to the columns of the stream's first frame: same
# names in the same order and the same kinds; a column that is all NA may take
# any kind, and integer may become double.  Else an arrow_codec_error naming
# the column.
.ai_conform_prepared <- function(prep, schema) {
  have <- vapply(prep$cols, function(col) col$name, "")
  want <- vapply(schema, function(col) col$name, "")
  if (!identical(have, want)) {
    k <- seq_len(max(length(have), length(want)))
    bad <- k[is.na(have[k]) | is.na(want[k]) | have[k] != want[k]][1L]
    name <- if (is.na(have[bad])) want[bad] else have[bad]
    .ai_col_error(name, sprintf(paste0("a later batch has the columns (%s), the stream's first ",
                                       "batch had (%s)"),
                                paste(have, collapse = ", "), paste(want, collapse = ", ")))
  }
  for (j in seq_along(schema)) {
    col <- prep$cols[[j]]
    kind <- schema[[j]]$kind
    if (col$kind == kind) next
    n <- prep$nrow
    if (col$kind %in% c("utf8", "dict") && kind %in% c("utf8", "dict")) {
      # strings plain in one frame and dictionary-encoded in another
      x <- if (col$kind == "dict") col$dict[col$x] else col$x
      col <- if (kind == "utf8") list(kind = "utf8", x = x, name = col$name)
             else { u <- unique(x); u <- u[!is.na(u)]
                    list(kind = "dict", x = match(x, u), dict = u, name = col$name) }
      prep$cols[[j]] <- col
      next
    }
    allna <- if (col$kind == "binary") all(col$isnull) else all(is.na(col$x))
    if (allna) {
      if (kind == "dict") col$dict <- character(0)
      col$x <- switch(kind, bool = rep(NA, n), int32 = , dict = rep(NA_integer_, n),
                      utf8 = rep(NA_character_, n), binary = vector("list", n), rep(NA_real_, n))
      if (kind == "binary") col$isnull <- rep(TRUE, n)
    } else if (col$kind == "int32" && kind %in% c("float64", "int64")) {
      col$x <- as.double(col$x)
    } else {
      .ai_col_error(col$name, sprintf("a later batch gives it type %s; the stream's first batch gave %s",
                                      .ai_kind_names[[col$kind]], .ai_kind_names[[kind]]))
    }
    col$kind <- kind
    col$tz <- schema[[j]]$tz
    prep$cols[[j]] <- col
  }
  prep
}

# A batch whose string or binary data would pass the 32-bit offsets: the
# writer splits it (a single value that large cannot be written at all).
.ai_max_offset <- 2147483647
.ai_batch_too_big <- function(name, n) {
  if (n <= 1)
    .ai_col_error(name, "a single value holds more than 2 GiB, beyond Arrow's 32-bit offsets")
  stop(structure(class = c("ai_batch_too_big", "error", "condition"),
                 list(message = "batch too big", call = NULL)))
}

# The record batch messages of a prepared frame, at most batch_rows rows each
# (the whole frame in one batch when it fits: no column is copied), halved
# where a batch would hold more than 2 GiB of strings.
.ai_emit_batches <- function(prep, emit, batch_rows) {
  nrow <- prep$nrow
  batch_rows <- max(1L, as.integer(batch_rows))
  for (m in .ai_dict_messages(prep)) .ai_emit_message(m, emit)
  one <- function(a, z) {
    whole <- a == 1 && z == nrow
    m <- tryCatch(.ai_batch_message(prep, if (whole) NULL else a:z, z - a + 1),
                  ai_batch_too_big = function(e) NULL)
    if (!is.null(m)) return(.ai_emit_message(m, emit))
    mid <- a + (z - a + 1) %/% 2 - 1
    one(a, mid)
    one(mid + 1, z)
  }
  if (nrow <= batch_rows) return(invisible(one(1, nrow)))
  for (a in seq(1, nrow, by = batch_rows)) one(a, min(nrow, a + batch_rows - 1))
  invisible(NULL)
}

.ai_emit_message <- function(m, emit) {
  emit(m$meta)
  for (p in m$body) emit(p)
}

.ai_eos <- as.raw(c(0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0))

# A streaming writer: list(write(df_or_prepared), close()).  The first write
# sends the schema (from that frame's columns), every write its rows as record
# batches (a later frame must have the same columns; see .ai_conform_prepared);
# close() sends the end-of-stream marker (and, when nothing was written, a
# schema without columns first), and returns the stream as a raw vector when
# con is NULL.  con: as for arrow_write_stream.
arrow_stream_writer <- function(con = NULL, batch_rows = 1048576L, vectors = FALSE) {
  out <- .ai_emitter(con, vectors)
  st <- new.env(parent = emptyenv())
  st$schema <- NULL
  st$closed <- FALSE
  write <- function(df) {
    if (st$closed) stop("arrow_stream_writer: write after close")
    prep <- arrow_prepare_frame(df)
    if (is.null(st$schema)) {
      out$emit(.ai_schema_message(prep))
      st$schema <- lapply(prep$cols, function(col) list(name = col$name, kind = col$kind, tz = col$tz))
    } else {
      prep <- .ai_conform_prepared(prep, st$schema)
    }
    .ai_emit_batches(prep, out$emit, batch_rows)
    invisible(prep$nrow)
  }
  close <- function() {
    if (st$closed) return(invisible(NULL))
    st$closed <- TRUE
    if (is.null(st$schema)) out$emit(.ai_schema_message(list(cols = list(), nrow = 0L)))
    out$emit(.ai_eos)
    out$finish()
  }
  list(write = write, close = close, started = function() !is.null(st$schema))
}

arrow_write_stream <- function(df, con = NULL, batch_rows = 1048576L, vectors = FALSE) {
  w <- arrow_stream_writer(con, batch_rows, vectors)
  w$write(df)
  w$close()
}
