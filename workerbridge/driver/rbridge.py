"""The Python half of the R package: what R's reticulate calls, in a few calls.

Covers: starting a SparkSession for R (``session``), moving data between R and
Spark as Arrow IPC stream bytes (R encodes and decodes them with the R child's
own codec, ``rscripts/arrow_ipc.R``; no pandas on the way), running an
:class:`~workerbridge.driver.closure.RFunction` through :func:`spark_apply`, and turning
any exception into plain fields that R raises as a condition (``call``).
Does not cover: the R side (``R/`` of this repository), the closure's
serialization (R's own ``serialize()``), the task (``worker``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from .api import spark_apply, spark_log
from . import compat
from .closure import RFunction
from ..wire.errors import TaskError, WorkerBridgeError
from ..task.runtime import r_scripts_dir

ERROR_NAMES = ("BadInputError", "ClosureError", "LimitError", "ChildDiedError",
               "TransportError", "TaskError")


def call(fn: Callable, *args: Any, **kwargs: Any) -> tuple:
    """``(True, value)``, or ``(False, error fields)`` when ``fn`` raises.

    >>> call(int, "7")
    (True, 7)
    >>> call(int, "x")[1]["type"]
    'ValueError'
    """
    try:
        return True, fn(*args, **kwargs)
    except Exception as e:           # every failure goes back to R as a condition
        return False, describe_error(e)


def describe_error(e: BaseException) -> dict:
    """type, kind (the workerbridge error class, also when it travelled inside
    a Spark task's exception text), message (``str(e)``, the text Python shows)."""
    kind = next((c.__name__ for c in type(e).__mro__ if c.__name__ in ERROR_NAMES), None)
    message = str(e)
    if kind is None and not isinstance(e, WorkerBridgeError):
        # a task's error reaches the driver as text inside Spark's exception
        hits = [(message.rfind(f"workerbridge.wire.errors.{n}: "), n) for n in ERROR_NAMES]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            kind = max(hits)[1]
    out = {"type": type(e).__name__, "kind": kind or "", "message": message}
    if isinstance(e, TaskError):
        out.update(partition=str(e.partition), language=e.language, role=e.role)
    return out


def session(master: Optional[str], remote: Optional[str], config: dict, app_name: str,
            python: str):
    """A SparkSession: ``remote`` (Spark Connect) or ``master``; executors run ``python``."""
    from pyspark.sql import SparkSession
    os.environ.setdefault("PYSPARK_PYTHON", python or sys.executable)
    builder = SparkSession.builder.appName(app_name)
    builder = builder.remote(remote) if remote else builder.master(master)
    for key, value in config.items():
        builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
    return builder.getOrCreate()


def frame_from_ipc(spark, data: bytearray, partitions: int = 0):
    """A Spark DataFrame from Arrow IPC stream bytes (R's ``arrow_write_stream``)."""
    import pyarrow as pa
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    df = spark.createDataFrame(table)
    return df.repartition(int(partitions)) if partitions else df


def frame_to_ipc(df) -> bytearray:
    """A Spark DataFrame's rows as Arrow IPC stream bytes (for R's ``arrow_read_stream``)."""
    return table_to_ipc(compat.to_arrow(df))


def table_to_ipc(table) -> bytearray:
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytearray(sink.getvalue())


def apply(df, payload: bytearray, schema: Any, names: Optional[list], options: dict):
    """``spark_apply`` of the serialized R closure ``payload``; ``names`` renames the
    result's columns.  With ``fetch_result_as_sdf=False`` a list of ``("frame",
    Arrow IPC bytes)`` or ``("value", value)`` pairs, one per partition or group."""
    out = spark_apply(df, RFunction(payload), schema=schema, **options)
    if isinstance(out, list):
        return [_unit(u) for u in out]
    if names:
        if len(names) != len(out.columns):
            raise WorkerBridgeError(
                f"columns= names {len(names)} columns, but the result has "
                f"{len(out.columns)}: {out.columns}; name them all, or give their types")
        out = out.toDF(*names)
    return out


def _unit(value: Any) -> tuple:
    import pandas as pd
    import pyarrow as pa
    if isinstance(value, pd.DataFrame):
        return "frame", table_to_ipc(pa.Table.from_pandas(value, preserve_index=False))
    return "value", value


def logs(spark, filter: Optional[str], n: Optional[int]) -> list:
    return spark_log(spark, filter=filter, n=None if n is None else int(n))


def scripts_dir() -> str:
    """The directory of the R child's files (``arrow_ipc.R`` for the R package's codec)."""
    return str(r_scripts_dir())
