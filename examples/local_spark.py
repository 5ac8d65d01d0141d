"""The local SparkSession every example uses: loopback only, quiet, executors in this venv."""

import os
import sys

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)   # executors use this interpreter
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def local_spark(app: str, cores: int = 2):
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master(f"local[{cores}]").appName(app)
             .config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark
