"""Spark's own channel for Python worker logs (Spark 4.1+), a second source for ``spark_log``.

Covers: whether the session collects Python worker logs
(``spark.sql.pyspark.worker.logging.enabled``), reading workerbridge's lines from
``spark.tvf.python_worker_logs()`` and merging them with the Gateway's without
duplicates.  Workers hand every line to the logger ``wire.logline.SPARK_LOGGER`` when the
setting is on (``task.logsink``), so the table holds each line once; a line the
Gateway holds as well is shown once.  Where executors cannot reach the Gateway
(another network, a Spark Connect client) the table is the only source.  Does
not cover: the Gateway (``gateway``).
"""

from __future__ import annotations

import collections
from typing import Iterable

from ..wire.logline import SPARK_LOGGER, parse_line

CONF = "spark.sql.pyspark.worker.logging.enabled"


def enabled(spark) -> bool:
    """Whether this session has Spark collect its Python workers' logs."""
    try:
        return str(spark.conf.get(CONF, "false")).strip().lower() == "true"
    except Exception:                   # noqa: BLE001 - an older Spark has no such conf
        return False


def worker_lines(spark) -> list[tuple[float, str]]:
    """(time, line) of every workerbridge line in Spark's Python worker log table,
    oldest first; empty where this pyspark has no such table."""
    table = getattr(getattr(spark, "tvf", None), "python_worker_logs", None)
    if table is None:
        return []
    rows = table().where(f"logger = '{SPARK_LOGGER}'").select("ts", "msg").collect()
    found = [(r["ts"].timestamp() if r["ts"] is not None else 0.0, r["msg"]) for r in rows
             if r["msg"] and parse_line(r["msg"])]
    return sorted(found, key=lambda e: e[0])


def merge(gateway: Iterable[tuple[float, str]],
          spark: Iterable[tuple[float, str]]) -> list[tuple[float, str]]:
    """The Gateway's events, plus the table's lines the Gateway does not hold (as many
    times as the table holds them beyond the Gateway's count), in time order."""
    gateway = list(gateway)
    held = collections.Counter(line for _, line in gateway)
    extra = []
    for when, line in spark:
        if held[line] > 0:
            held[line] -= 1
        else:
            extra.append((when, line))
    return sorted(gateway + extra, key=lambda e: e[0]) if extra else gateway
