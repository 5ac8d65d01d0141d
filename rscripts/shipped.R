# Shipped R packages in the RScript child: which to use, and a clear refusal.
#
# Covers: given the TASK's r_lib (the unpacked bundle: one library directory
# per package, r_lib/<pkg>/<pkg>) and options$ship_r (parallel name, version,
# compiled lists), putting in front of .libPaths() only the packages this node
# lacks or has in another version (a matching version on the node is used as
# it is), and refusing a compiled package built for another platform or R
# version (x.y) than this node's, with the node's and the package's values.
# The library paths are reset per task, so a warm child does not keep the
# previous call's packages in front.  Does not cover: loading them (child.R
# does, for packages=) or building the bundle (workerbridge/ship_r.py).

wb_lib0 <- NULL      # the node's own .libPaths(), taken at the first task

# A failure payload (kind "package"), or NULL when the packages are usable.
wb_use_shipped <- function(task, log_msg) {
  if (is.null(wb_lib0)) wb_lib0 <<- .libPaths()
  .libPaths(wb_lib0)
  ship <- task$options$ship_r
  root <- task$r_lib
  if (is.null(ship) || !is.character(root) || length(root) != 1L) return(NULL)
  names <- as.character(ship$name)
  versions <- as.character(ship$version)
  compiled <- as.logical(ship$compiled)
  use <- character(0)
  own <- character(0)
  for (i in seq_along(names)) {
    p <- names[[i]]
    have <- suppressWarnings(utils::packageDescription(p, lib.loc = wb_lib0, fields = "Version"))
    if (identical(as.character(have), versions[[i]])) {
      own <- c(own, sprintf("%s %s", p, versions[[i]]))
      next
    }
    lib <- file.path(root, p)
    if (isTRUE(compiled[[i]])) {
      bad <- wb_built_elsewhere(file.path(lib, p, "DESCRIPTION"))
      if (!is.null(bad))
        return(list(kind = "package", type = "packageBuiltElsewhere", package = p, call = NULL,
                    traceback = I(character(0)),
                    message = sprintf(paste0(
                      "the shipped R package '%s' %s has compiled code built for %s; this node ",
                      "runs R %s on %s, so it is not loaded (it could crash R). Install '%s' on ",
                      "this node (then its own copy is used), or make the driver's R match the nodes'"),
                      p, versions[[i]], bad, paste(R.version$major, R.version$minor, sep = "."),
                      R.version$platform, p)))
    }
    use <- c(use, lib)
  }
  if (length(own))
    log_msg(sprintf("uses this node's own R packages (the driver's versions): %s",
                    paste(own, collapse = ", ")))
  if (length(use)) {
    .libPaths(c(use, wb_lib0))
    log_msg(sprintf("uses shipped R packages: %s",
                    paste(basename(use), versions[match(basename(use), names)],
                          collapse = ", ")))
  }
  NULL
}

# "R x.y.z on platform" when a package's Built field names another platform or
# R x.y than this R; NULL when it matches (or says nothing).
wb_built_elsewhere <- function(description) {
  built <- tryCatch(read.dcf(description, fields = "Built")[1L, 1L], error = function(e) NA)
  if (is.na(built)) return(NULL)
  parts <- trimws(strsplit(built, ";", fixed = TRUE)[[1L]])
  r_version <- sub("^R ", "", parts[1L])
  platform <- if (length(parts) >= 2L) parts[2L] else ""
  here <- paste(R.version$major, strsplit(R.version$minor, ".", fixed = TRUE)[[1L]][1L], sep = ".")
  there <- paste(strsplit(r_version, ".", fixed = TRUE)[[1L]][1:2], collapse = ".")
  if (identical(there, here) && (!nzchar(platform) || identical(platform, R.version$platform)))
    return(NULL)
  sprintf("R %s on %s", r_version, if (nzchar(platform)) platform else "an unnamed platform")
}
