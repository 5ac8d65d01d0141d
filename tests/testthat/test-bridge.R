# The link to Python, without Spark: which interpreter, and the check before
# the codec is sourced.

test_that("a Python that does not exist is named in the error", {
  expect_error(workerbridge:::wb_python_path("/no/such/python"),
               "Python interpreter not found as '/no/such/python'")
  expect_error(workerbridge:::wb_python_path(c("a", "b")), "one string")
  withr::local_envvar(WORKERBRIDGE_PYTHON = "/also/missing/python")
  expect_error(workerbridge:::wb_python_path(NULL), "'/also/missing/python'")
})

test_that("files another user could have written are not sourced", {
  check <- workerbridge:::wb_check_private
  dir <- withr::local_tempdir()
  ok <- file.path(dir, "ok.R")
  writeLines("x <- 1", ok)
  Sys.chmod(ok, "0644")
  expect_true(check(ok))
  open <- file.path(dir, "open.R")
  writeLines("x <- 1", open)
  Sys.chmod(open, "0666", use_umask = FALSE)
  expect_error(check(open), "may be written by other users")
  link <- file.path(dir, "link.R")
  file.symlink(ok, link)
  expect_error(check(link), "is a symbolic link")
  expect_error(check(file.path(dir, "missing.R")), "does not exist")
  if (Sys.info()[["effective_user"]] == "root") {
    theirs <- file.path(dir, "theirs.R")
    writeLines("x <- 1", theirs)
    system2("chown", c("65534:65534", theirs))
    expect_error(check(theirs), "belongs to 'nobody'")
  }
})
