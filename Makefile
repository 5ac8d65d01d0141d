# The two commands of the README: `make demo` and `make test`.
# Both install what is missing: Rscript (Debian r-base-core), Java, ip (iproute2,
# for the two-host test cluster), and a venv
# at .venv with workerbridge installed editable.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYSPARK_PYTHON := $(abspath $(PY))
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: setup system demo test bench clean test-compat

setup: system $(STAMP)

system:
	@missing=""; \
	command -v Rscript >/dev/null 2>&1 || missing="$$missing r-base-core"; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-compat

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache

# ---- The R package (R/, man/, tests/testthat): R users drive PySpark from R.
# make setup installs reticulate, testthat and codetools (Debian r-cran-*);
# make test runs R CMD check on the built package, which runs the testthat
# tests against this checkout's .venv (WORKERBRIDGE_PYTHON).  R CMD check's
# report: build/rcheck/workerbridge.Rcheck/00check.log.
R_DEBS := r-cran-reticulate r-cran-testthat r-cran-codetools
RCHECK := build/rcheck
# the package's files, staged so that R CMD build does not copy .venv first
R_PKG  := DESCRIPTION NAMESPACE .Rbuildignore R man tests/testthat.R tests/testthat
.PHONY: r-deps r-check
setup: r-deps
test: r-check

r-deps: system
	@Rscript -e 'ok <- vapply(c("reticulate", "testthat", "codetools"), requireNamespace, NA, quietly = TRUE); q(status = !all(ok))' 2>/dev/null || { \
	  echo "installing: $(R_DEBS)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(R_DEBS); }

r-check: r-deps $(STAMP)
	rm -rf $(RCHECK) && mkdir -p $(RCHECK)/workerbridge
	cp -r --parents $(R_PKG) $(RCHECK)/workerbridge
	cd $(RCHECK) && R CMD build --no-build-vignettes --no-manual workerbridge
	cd $(RCHECK) && WORKERBRIDGE_PYTHON=$(abspath $(PY)) _R_CHECK_SYSTEM_CLOCK_=0 \
	  R CMD check --no-manual workerbridge_*.tar.gz || { \
	  cat workerbridge.Rcheck/tests/testthat.Rout.fail 2>/dev/null; exit 1; }
	@! grep -q "^Status:.*\(WARNING\|ERROR\)" $(RCHECK)/workerbridge.Rcheck/00check.log

# ---- compatibility matrix: pyspark 3.5 + pandas 2 in a second venv -------------------
# `make test` runs the whole suite in .venv (the default install: pyspark 4.x) and then
# this subset in .venv-compat: the oldest combination we support, pinned to what
# pyspark 3.5 itself declares (numpy < 2) with pandas 2.2 and pyarrow 15 (our minimum).
# pyspark 3.5 ships no Spark Connect server, so its Connect client is tested against
# the 4.x server of .venv (executors: .venv's Python).
COMPAT_VENV  := .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_PINS  := 'pyspark[connect]>=3.5,<3.6' 'pandas>=2.2,<2.3' 'pyarrow>=15,<16' 'numpy<2'
COMPAT_TESTS := tests/test_compat.py tests/test_apply_python.py tests/test_children_shared.py \
                tests/test_options_python.py tests/test_bad_input.py \
                tests/test_faults.py::test_fault_surfaces_through_spark_and_session_stays_usable \
                tests/test_connect.py::test_connect_server_both_languages

$(COMPAT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q -e '.[test]' $(COMPAT_PINS)
	touch $(COMPAT_STAMP)

test-compat: setup $(COMPAT_STAMP)
	PYSPARK_PYTHON=$(abspath $(COMPAT_PY)) \
	WORKERBRIDGE_TEST_CONNECT_SERVER_PYTHON=$(abspath $(PY)) \
	  $(COMPAT_PY) -m pytest -p no:cacheprovider $(COMPAT_TESTS)
