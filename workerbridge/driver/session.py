"""This session's Gateway: one per SparkSession (or Spark Connect session).

Covers: finding the active session, the key that names a session, and the
session's Gateway with its log file, started on first use.  Does not cover:
the Gateway server itself (``gateway``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from pyspark.sql import SparkSession

from ..wire.errors import BadInputError
from .gateway import Gateway
from .options import CONF_PREFIX


def active_session():
    spark = SparkSession.getActiveSession()
    if spark is None:
        raise BadInputError("no active SparkSession; pass spark=")
    return spark


def session_key(spark) -> str:
    try:
        return f"app-{spark.sparkContext.applicationId}"
    except Exception:                     # Spark Connect has no SparkContext
        return f"connect-{getattr(spark, 'session_id', id(spark))}"


def session_gateway(spark) -> Gateway:
    key = session_key(spark)

    def path() -> Optional[str]:
        configured = spark.conf.get(CONF_PREFIX + "log.path", None)
        if configured:
            return configured
        # Spark Connect: spark.local.dir is the server's, not a path on this client host.
        server = None if key.startswith("connect-") else spark.conf.get("spark.local.dir", None)
        local = (server or tempfile.gettempdir()).split(",")[0]
        os.makedirs(local, exist_ok=True)
        return os.path.join(local, f"workerbridge-{key}.log")

    max_lines = int(spark.conf.get(CONF_PREFIX + "log.maxLines", "100000"))
    return Gateway.for_key(key, path, max_lines)


def existing_gateway(spark=None) -> Optional[Gateway]:
    """The Gateway of ``spark`` (default: the active session), or None before any job."""
    return Gateway.existing(session_key(spark or active_session()))
