# R CMD check runs this file; `make test` runs R CMD check.
library(testthat)
library(workerbridge)

test_check("workerbridge")
