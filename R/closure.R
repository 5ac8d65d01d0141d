# Packing an R function for the child: the function, what it uses from the
# global environment, and its context, in one serialize().
#
# Covers: finding the free variables and helper functions of f by walking its
# code (codetools::findGlobals, as the globals of R's futures are found), and
# those of the helpers in turn; copying the ones that live in the global
# environment into one environment that travels with f; the R packages f uses
# from the search path (beyond those Rscript attaches itself).  Values that
# live in a function's own enclosing environments travel with it anyway.
# Does not cover: running it (rscripts/child.R: wb_unserialize_closure).

wb_closure_kind <- "workerbridge R closure"

# Packages every Rscript attaches; their functions need no packages= entry.
wb_default_packages <- c("base", "datasets", "utils", "grDevices", "graphics", "stats",
                         "methods")

# list(payload = raw (XDR serialization), packages = character, globals = names)
wb_pack_closure <- function(f, context = NULL) {
  st <- new.env(parent = emptyenv())
  st$captured <- list()
  st$packages <- character(0)
  st$seen <- list()
  wb_walk_function(f, st)
  # One deep copy of f and everything captured: environments they share stay
  # shared, and the user's own objects are never modified below.
  copy <- unserialize(serialize(list(f = f, captured = st$captured), NULL))
  globals <- list2env(copy$captured, parent = globalenv())
  for (nm in names(copy$captured)) {
    v <- get(nm, envir = globals, inherits = FALSE)
    if (is.function(v)) assign(nm, wb_rehome(v, globals), envir = globals)
  }
  obj <- list(kind = wb_closure_kind, f = wb_rehome(copy$f, globals), context = context,
              globals = globals)
  list(payload = serialize(obj, NULL, xdr = TRUE), packages = st$packages,
       globals = names(st$captured))
}

# Record what `fun` uses: globals (copied), local helpers (walked), packages.
wb_walk_function <- function(fun, st) {
  if (typeof(fun) != "closure") return(invisible())
  if (any(vapply(st$seen, identical, NA, fun))) return(invisible())
  st$seen[[length(st$seen) + 1L]] <- fun
  for (nm in codetools::findGlobals(fun, merge = TRUE)) {
    where <- wb_where(nm, environment(fun))
    if (is.null(where)) next                        # not defined here: R will say so
    if (identical(where, globalenv())) {
      if (nm %in% names(st$captured)) next
      val <- get(nm, envir = where, inherits = FALSE)
      st$captured[nm] <- list(val)
      wb_walk_function(val, st)
    } else if (wb_is_local_env(where)) {
      wb_walk_function(get(nm, envir = where, inherits = FALSE), st)
    } else {
      pkg <- wb_env_package(where)
      if (!is.null(pkg) && !(pkg %in% c(wb_default_packages, "workerbridge")))
        st$packages <- union(st$packages, pkg)
    }
  }
  invisible()
}

# The environment on env's chain that binds name, or NULL.
wb_where <- function(name, env) {
  while (!identical(env, emptyenv())) {
    if (exists(name, envir = env, inherits = FALSE)) return(env)
    env <- parent.env(env)
  }
  NULL
}

# A user's environment (a function's frame, new.env()): not the global one,
# a package, a namespace or base.
wb_is_local_env <- function(env) {
  !identical(env, globalenv()) && !isNamespace(env) && !nzchar(environmentName(env))
}

# "stats" for package:stats or the stats namespace, else NULL.
wb_env_package <- function(env) {
  if (isNamespace(env)) return(getNamespaceName(env)[[1L]])
  name <- environmentName(env)
  if (startsWith(name, "package:")) return(sub("^package:", "", name))
  NULL
}

# fun (a copy) with the global environment on its chain replaced by `globals`,
# so that what it uses from there is found among the captured values.  A chain
# through this package's namespace (functions defined in its tests) ends there
# too: the child has no workerbridge package.
wb_rehome <- function(fun, globals) {
  if (typeof(fun) != "closure") return(fun)
  env <- environment(fun)
  if (identical(env, globalenv())) {
    environment(fun) <- globals
    return(fun)
  }
  while (wb_is_local_env(env) && !identical(env, globals)) {
    up <- parent.env(env)
    if (identical(up, globalenv()) || identical(up, topenv())) {
      parent.env(env) <- globals                   # env belongs to the copy
      break
    }
    env <- up
  }
  fun
}
