"""One local SparkSession for the whole test session, and a process-leak check."""

from __future__ import annotations

import os
import sys
import time

import pytest

from wbtest import child_processes

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession
    session = (SparkSession.builder.master("local[2]")
               .appName("workerbridge-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.task.maxFailures", "1")
               # Warm reuse is tested on its own (test_reuse.py); elsewhere every task
               # starts and ends its child, so the leak check after each test is strict.
               .config("spark.workerbridge.reuse", "false")
               .getOrCreate())
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def no_leaked_children():
    """After every test: no PyScript or RScript child is left running."""
    before = child_processes()
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = child_processes() - before
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"child processes outlived their tasks: {sorted(left)}")
