# spark_apply() for R users: an R function over every partition or group.
#
# Covers: argument checks on the R side, columns= as a DDL string, types by
# name or result names, the packages f needs, and handing the packed closure
# (closure.R) with every other option of the Python spark_apply to it.  Does
# not cover: what the Python side checks and runs (workerbridge/driver/api.py).

# sparklyr users' type names, mapped to Spark's.
wb_type_names <- c(character = "string", numeric = "double", integer = "int",
                   logical = "boolean", Date = "date", POSIXct = "timestamp")

spark_apply <- function(x, f, columns = NULL, group_by = NULL, context = NULL,
                        packages = NULL, ...) {
  if (is.data.frame(x))
    stop("x is an R data.frame; copy it to Spark first: x <- wb_copy_to(sc, df)", call. = FALSE)
  if (!wb_is_spark_frame(x))
    stop(sprintf("x must be a Spark DataFrame, not %s", paste(class(x), collapse = "/")),
         call. = FALSE)
  if (!is.function(f))
    stop(sprintf("f must be an R function such as function(df) df, not %s",
                 paste(class(f), collapse = "/")), call. = FALSE)
  if (!is.null(packages) && (!is.character(packages) || anyNA(packages)))
    stop("packages= takes a character vector of R package names", call. = FALSE)
  if (!is.null(group_by) && (!is.character(group_by) || !length(group_by)))
    stop("group_by= takes a character vector of column names", call. = FALSE)
  packed <- wb_pack_closure(f, context)
  schema <- wb_columns(columns)
  opts <- list(...)
  if (length(opts) && (is.null(names(opts)) || any(!nzchar(names(opts)))))
    stop("the options in ... must be named, e.g. timeout = 60", call. = FALSE)
  opts$group_by <- if (!is.null(group_by)) as.list(group_by)
  pkgs <- union(as.character(packages), packed$packages)
  if (length(pkgs)) opts$packages <- as.list(pkgs)
  out <- wb_call("apply", x, packed$payload, schema$ddl, schema$names, wb_dict(opts))
  if (is.list(out) && !wb_is_spark_frame(out)) return(lapply(out, wb_unit_value))
  out
}

# columns= as list(ddl, names): NULL (inferred); "a double, b string"; types
# by name, c(a = "double", b = "character"); or result names only, c("a", "b").
wb_columns <- function(columns) {
  if (is.null(columns)) return(list(ddl = NULL, names = NULL))
  if (is.list(columns)) columns <- unlist(columns)
  if (!is.character(columns) || !length(columns) || anyNA(columns))
    stop(paste0("columns= takes a DDL string ('id long, y double'), types by name ",
                "(c(id = 'long', y = 'double')) or the result's column names"), call. = FALSE)
  nms <- names(columns)
  if (!is.null(nms) && all(nzchar(nms))) {
    types <- ifelse(columns %in% names(wb_type_names), wb_type_names[columns], columns)
    ddl <- paste(sprintf("`%s` %s", gsub("`", "``", nms, fixed = TRUE), types), collapse = ", ")
    return(list(ddl = ddl, names = NULL))
  }
  if (length(columns) == 1L && grepl("[[:space:]]", trimws(columns)))
    return(list(ddl = columns, names = NULL))
  list(ddl = NULL, names = as.list(columns))
}

# One unit of fetch_result_as_sdf = FALSE: a data.frame, or a value.
wb_unit_value <- function(unit) {
  if (identical(unit[[1L]], "frame")) wb_codec()$arrow_read_stream(unit[[2L]]) else unit[[2L]]
}
