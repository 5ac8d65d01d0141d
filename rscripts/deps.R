# The R packages a closure needs, as the driver's R sees them (run on the driver only).
#
# Covers: finding package names in R source (library(), require(),
# requireNamespace(), loadNamespace(), pkg::fn, pkg:::fn) by walking the parsed
# code, not by matching text; and, for the named and found packages that the
# driver's library has (.libPaths(), R_LIBS included), their recursive
# Depends/Imports, without R's base packages.  Does not cover: packing or
# shipping them (workerbridge/ship_r.py).
#
# Usage: Rscript deps.R [--scan] name ...   (with --scan: R source on stdin)
# Prints one tab-separated line per package:
#   PKG  name  version  library-path  compiled(TRUE/FALSE)
#   MISSING  name            (named or found, but not in the driver's library)

wb_scan_packages <- function(exprs) {
  found <- character(0)
  loaders <- c("library", "require", "requireNamespace", "loadNamespace")
  walk <- function(e) {
    if (is.call(e)) {
      fn <- e[[1L]]
      if (is.symbol(fn) && as.character(fn) %in% c("::", ":::") && length(e) == 3L) {
        found <<- c(found, as.character(e[[2L]]))
        return(invisible())
      }
      if (is.symbol(fn) && as.character(fn) %in% loaders && length(e) >= 2L &&
          !isTRUE(as.list(e)$character.only)) {
        args <- as.list(e)[-1L]
        arg <- if ("package" %in% names(args)) args[["package"]] else args[[1L]]
        if (is.symbol(arg) || (is.character(arg) && length(arg) == 1L))
          found <<- c(found, as.character(arg))
      }
      parts <- as.list(e)
      for (i in seq_along(parts)) {
        if (!identical(parts[[i]], quote(expr = ))) walk(parts[[i]])
      }
    } else if (is.pairlist(e)) {
      for (i in seq_along(e)) {
        if (!identical(e[[i]], quote(expr = ))) walk(e[[i]])
      }
    }
    invisible()
  }
  for (ex in exprs) walk(ex)
  unique(found[nzchar(found)])
}

wb_package_lines <- function(wanted) {
  ip <- utils::installed.packages()
  ip <- ip[!duplicated(ip[, "Package"]), , drop = FALSE]      # the first in .libPaths() wins
  rownames(ip) <- ip[, "Package"]
  base <- rownames(utils::installed.packages(priority = "base"))
  wanted <- setdiff(unique(wanted), base)
  have <- intersect(wanted, rownames(ip))
  deps <- if (length(have))
    unlist(tools::package_dependencies(have, db = ip, which = c("Depends", "Imports"),
                                       recursive = TRUE), use.names = FALSE) else character(0)
  all <- setdiff(unique(c(have, deps)), base)
  all <- intersect(all, rownames(ip))
  lines <- vapply(all, function(p) {
    path <- file.path(ip[p, "LibPath"], p)
    paste("PKG", p, ip[p, "Version"], ip[p, "LibPath"], dir.exists(file.path(path, "libs")), sep = "\t")
  }, "")
  missing <- setdiff(wanted, rownames(ip))
  c(lines, if (length(missing)) paste("MISSING", missing, sep = "\t"))
}

local({
  args <- commandArgs(trailingOnly = TRUE)
  scan <- length(args) && args[[1L]] == "--scan"
  wanted <- if (scan) args[-1L] else args
  if (scan) {
    con <- file("stdin")
    src <- readLines(con, warn = FALSE, encoding = "UTF-8")
    close(con)
    wanted <- c(wanted, wb_scan_packages(parse(text = src, keep.source = FALSE)))
  }
  writeLines(wb_package_lines(wanted))
})
