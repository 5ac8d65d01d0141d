# spark_apply() from R on a real local Spark: data both ways, closures with
# captured values and helpers, group_by with lm, context, options, errors, logs.

iris_sdf <- function(sc) wb_copy_to(sc, iris, repartition = 3)

sorted <- function(df, by) {
  df <- df[do.call(order, unname(as.list(df[by]))), , drop = FALSE]
  rownames(df) <- NULL
  df
}

test_that("a data.frame goes to Spark and back with its types", {
  sc <- test_spark()
  df <- data.frame(i = c(1L, NA, 3L), d = c(1.5, NA, -2), b = c(TRUE, NA, FALSE),
                   s = c("a", NA, "\u00e9t\u00e9"), day = as.Date(c("2024-01-01", NA, "1970-01-02")),
                   t = as.POSIXct(c("2024-01-01 10:00:00", NA, "2000-02-29 23:59:59"), tz = "UTC"),
                   f = factor(c("x", "y", NA)), stringsAsFactors = FALSE)
  back <- sorted(wb_collect(wb_copy_to(sc, df, repartition = 2)), "d")
  want <- sorted(transform(df, f = as.character(f)), "d")
  expect_identical(names(back), names(want))
  for (col in names(want))
    expect_equal(back[[col]], want[[col]], ignore_attr = "tzone", info = col)
  expect_identical(names(wb_collect(wb_copy_to(sc, iris)))[1:2], c("Sepal_Length", "Sepal_Width"))
})

test_that("captured values and helper functions from the global environment run in the child", {
  sc <- test_spark()
  clean_global(c("k", "add_one", "scale_by", "f"))
  in_global(quote({
    k <- 3
    add_one <- function(v) v + 1
    scale_by <- function(v) add_one(v) * k
    f <- function(d) { d$y <- scale_by(d$Sepal_Length); d[, c("Species", "Sepal_Length", "y")] }
  }))
  out <- wb_collect(spark_apply(iris_sdf(sc), get("f", globalenv())))
  expect_equal(nrow(out), 150L)
  expect_equal(out$y, (out$Sepal_Length + 1) * 3)
  expect_setequal(out$Sepal_Length, iris$Sepal.Length)
})

test_that("group_by with lm matches R's own lm, per group", {
  sc <- test_spark()
  fit <- function(d) {
    m <- lm(Petal_Width ~ Petal_Length, data = d)
    data.frame(intercept = coef(m)[[1]], slope = coef(m)[[2]], n = nrow(d))
  }
  got <- sorted(wb_collect(spark_apply(iris_sdf(sc), fit, group_by = "Species")), "Species")
  want <- do.call(rbind, lapply(split(iris, iris$Species), function(d) {
    m <- lm(Petal.Width ~ Petal.Length, data = d)
    data.frame(Species = as.character(d$Species[1]), intercept = coef(m)[[1]],
               slope = coef(m)[[2]], n = nrow(d))
  }))
  rownames(want) <- NULL
  expect_equal(got, want, tolerance = 1e-12)
})

test_that("context= is any R object, given as f's second argument", {
  sc <- test_spark()
  model <- lm(Sepal.Width ~ Sepal.Length, data = iris)
  ctx <- list(model = model, keep = c("setosa", "virginica"))
  f <- function(d, ctx) {
    d <- d[d$Species %in% ctx$keep, , drop = FALSE]
    data.frame(Species = d$Species,
               pred = unname(predict(ctx$model, data.frame(Sepal.Length = d$Sepal_Length))))
  }
  out <- wb_collect(spark_apply(iris_sdf(sc), f, context = ctx,
                                columns = c(Species = "character", pred = "numeric")))
  expect_setequal(unique(out$Species), ctx$keep)
  expect_equal(sort(out$pred),
               sort(unname(predict(model, iris[iris$Species %in% ctx$keep, ]))), tolerance = 1e-12)
})

test_that("columns= as names renames the result; other options pass through ...", {
  sc <- test_spark()
  x <- wb_copy_to(sc, data.frame(v = as.numeric(1:20)), repartition = 2)
  out <- spark_apply(x, function(d) data.frame(a = d$v, b = d$v * 2), columns = c("first", "second"),
                     name = "r named job")
  expect_identical(names(wb_collect(out)), c("first", "second"))
  expect_true(any(grepl("compute starting for 'r named job'", spark_log(sc, n = 500), fixed = TRUE)))
  parts <- spark_apply(x, function(d) data.frame(n = nrow(d)), fetch_result_as_sdf = FALSE)
  expect_length(parts, 2L)
  expect_equal(sum(vapply(parts, function(p) p$n, 1)), 20)
})

test_that("an error in the closure is an R condition with the partition, R traceback and hint", {
  sc <- test_spark()
  clean_global(c("check_rows", "f"))
  in_global(quote({
    check_rows <- function(d) if (nrow(d) > 0) stop("too many rows: ", nrow(d))
    f <- function(d) { check_rows(d); d }
  }))
  x <- wb_copy_to(sc, data.frame(v = 1:10), repartition = 1)
  e <- tryCatch(wb_collect(spark_apply(x, get("f", globalenv()), columns = "v int")),
                error = function(e) e)
  expect_s3_class(e, "wb_closure_error")
  expect_s3_class(e, "wb_error")
  msg <- conditionMessage(e)
  expect_match(msg, "^RScript \\(R\\) failed in partition 0: simpleError: too many rows: 10")
  expect_match(msg, "check_rows(d)", fixed = TRUE)
  expect_match(msg, "Hint: the error happened in your closure")
  expect_match(e$python_message, msg, fixed = TRUE)
})

test_that("bad input carries the same text as the Python spark_apply raises", {
  sc <- test_spark()
  x <- wb_copy_to(sc, data.frame(v = 1:3))
  e <- tryCatch(spark_apply(x, function(d) d, group_by = "nope"), error = function(e) e)
  expect_s3_class(e, "wb_bad_input")
  wb <- reticulate::import("workerbridge")
  py <- tryCatch(wb$spark_apply(x, wb$R("function(d) d"), group_by = "nope"),
                 error = function(e) reticulate::py_last_error()$value)
  expect_identical(conditionMessage(e), py)
  expect_error(spark_apply(x, function(d) d, colums = 1), "unknown option\\(s\\) \\['colums'\\]",
               class = "wb_bad_input")
  expect_error(spark_apply(iris, function(d) d), "wb_copy_to")
  expect_error(wb_connect(python = Sys.which("python3")), "already runs Python")
  expect_error(wb_copy_to(sc, 1:3), "df must be a data.frame")
  expect_error(wb_copy_to(sc, data.frame(a.b = 1, a_b = 2)), "duplicate column names .*a_b")
  bad <- data.frame(id = 1:2)
  bad$l <- list(1, "a")
  expect_error(wb_copy_to(sc, bad), "cannot copy the data.frame to Spark: column 'l'")
  expect_error(wb_collect(42), "x must be a Spark DataFrame")
  expect_error(spark_apply(x, function(d) d, NULL, NULL, NULL, NULL, 60), "must be named")
  expect_error(wb_connect(config = list(1)), "named list")
  expect_error(spark_apply(x, function(d) data.frame(a = 1, b = 2), columns = c("only_one")),
               "columns= names 1 columns, but the result has 2", class = "wb_error")
  expect_error(spark_apply(x, "function(d) d"), "must be an R function")
})

test_that("a missing R package and a breached timeout fail clearly", {
  sc <- test_spark()
  x <- wb_copy_to(sc, data.frame(v = 1:3), repartition = 1)
  expect_error(wb_collect(spark_apply(x, function(d) d, columns = "v int",
                                      packages = "surelyNotAnRPackage")),
               "cannot load R package 'surelyNotAnRPackage' on this node", class = "wb_task_error")
  t0 <- Sys.time()
  e <- tryCatch(wb_collect(spark_apply(x, function(d) { Sys.sleep(60); d }, columns = "v int",
                                       timeout = 2)), error = function(e) e)
  expect_s3_class(e, "wb_limit_error")
  expect_match(conditionMessage(e), "timeout of 2 s breached")
  expect_lt(as.numeric(difftime(Sys.time(), t0, units = "secs")), 45)
})

# (schema inference on the driver runs as task "driver-N")
test_that("spark_log returns the lifecycle lines as a character vector", {
  sc <- test_spark()
  x <- wb_copy_to(sc, data.frame(v = 1:7), repartition = 1)
  wb_collect(spark_apply(x, function(d) { worker_log("hello from R"); d }, columns = "v int"))
  lines <- spark_log(sc, filter = "RScript", n = 50)
  expect_type(lines, "character")
  expect_true(all(grepl("RScript", lines, fixed = TRUE)))
  expect_true(all(grepl(paste0("^\\d\\d/\\d\\d/\\d\\d \\d\\d:\\d\\d:\\d\\d [A-Z]+ workerbridge: ",
                               "(Gateway|Worker|RScript|RClosure) \\((driver-)?\\d+\\) "), lines)))
  expect_true(any(grepl("applied closure to 7 rows", lines, fixed = TRUE)))
  expect_true(any(grepl("RClosure \\(\\d+\\) hello from R", spark_log(sc, filter = "RClosure"))))
  expect_length(spark_log(sc, n = 3), 3L)
  expect_error(spark_log(sc, n = "x"), "n= takes")
})

test_that("a Python without workerbridge is refused with a hint", {
  py3 <- Sys.which("python3")
  skip_if(!nzchar(py3), "no python3 on the PATH")
  has <- suppressWarnings(system2(py3, c("-c", shQuote("import workerbridge")),
                                  stdout = FALSE, stderr = FALSE))
  skip_if(has == 0L, "this python3 has workerbridge installed")
  script <- tempfile(fileext = ".R")
  writeLines(sprintf("library(workerbridge); wb_connect(python = '%s')", py3), script)
  out <- suppressWarnings(system2(file.path(R.home("bin"), "Rscript"), script,
                                  stdout = TRUE, stderr = TRUE))
  expect_match(paste(out, collapse = "\n"), "cannot import workerbridge.*Hint: install it there")
})
