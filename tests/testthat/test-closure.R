# Packing closures (no Spark): what travels with f, and that it runs without
# the global environment it came from.

unpack <- function(packed) {
  obj <- unserialize(packed$payload)
  expect_identical(obj$kind, "workerbridge R closure")
  obj
}

test_that("captured globals and helper functions travel with f", {
  clean_global(c("k", "scale_by", "add_one", "f"))
  in_global(quote({
    k <- 3
    add_one <- function(v) v + 1
    scale_by <- function(v) add_one(v) * k
    f <- function(d) { d$y <- scale_by(d$x); d }
  }))
  packed <- workerbridge:::wb_pack_closure(get("f", globalenv()))
  expect_setequal(packed$globals, c("scale_by", "add_one", "k"))
  obj <- unpack(packed)
  rm(list = c("k", "scale_by", "add_one"), envir = globalenv())
  expect_equal(obj$f(data.frame(x = 1:3))$y, (1:3 + 1) * 3)
})

test_that("the user's own functions and environments are left as they were", {
  clean_global(c("k", "h", "f"))
  in_global(quote({
    k <- 2
    h <- function(v) v * k
    f <- function(d) h(d)
  }))
  workerbridge:::wb_pack_closure(get("f", globalenv()))
  expect_identical(environment(get("h", globalenv())), globalenv())
  expect_identical(environment(get("f", globalenv())), globalenv())
})

test_that("a closure from a factory keeps its own values and finds globals", {
  clean_global(c("offset", "make"))
  in_global(quote({
    offset <- 100
    make <- function(m) { inner <- function(v) v * m + offset; function(d) inner(d) }
  }))
  f <- get("make", globalenv())(5)
  packed <- workerbridge:::wb_pack_closure(f)
  expect_identical(packed$globals, "offset")
  obj <- unpack(packed)
  rm("offset", envir = globalenv())
  expect_equal(obj$f(1:2), c(105, 110))
  # the factory's environment of the original is untouched
  expect_identical(parent.env(environment(f)), globalenv())
})

test_that("recursive helpers and the context travel; base and stats are not copied", {
  clean_global(c("fib", "f"))
  in_global(quote({
    fib <- function(n) if (n < 2) n else fib(n - 1) + fib(n - 2)
    f <- function(d, ctx) data.frame(v = fib(ctx$n) + stats::median(d$x))
  }))
  packed <- workerbridge:::wb_pack_closure(get("f", globalenv()), context = list(n = 10))
  expect_identical(packed$globals, "fib")
  obj <- unpack(packed)
  rm("fib", envir = globalenv())
  expect_equal(obj$f(data.frame(x = c(1, 2, 3)), obj$context)$v, 55 + 2)
})

test_that("functions of attached packages beyond Rscript's defaults become packages=", {
  withr::local_package("codetools")
  f <- function(d) { findGlobals(function() x); d }
  expect_identical(workerbridge:::wb_pack_closure(f)$packages, "codetools")
  g <- function(d) stats::lm(y ~ x, d)
  expect_identical(workerbridge:::wb_pack_closure(g)$packages, character(0))
})

test_that("columns= takes DDL, types by name (sparklyr's too) or names", {
  cols <- workerbridge:::wb_columns
  expect_identical(cols("id long, y double")$ddl, "id long, y double")
  expect_identical(cols(c(id = "long", s = "character", n = "numeric"))$ddl,
                   "`id` long, `s` string, `n` double")
  expect_identical(cols(c("a", "b"))$names, list("a", "b"))
  expect_null(cols(NULL)$ddl)
  expect_error(cols(3), "columns= takes")
})
