"""The public API: ``spark_apply`` and ``spark_log``.

Covers: argument checks (before any job runs), packing the closure, the output
schema (given, or inferred by running the same Worker on a sample in a child on
the driver), the session's Gateway, and wiring it all into ``mapInArrow``.
Does not cover: what happens inside a task (``worker``).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from typing import Any, Callable, Optional, Union

from .closure import R, R_LANG, pack
from .errors import BadInputError
from .gateway import Gateway
from .runtime import Runtime
from .schema import arrow_to_struct, spark_arrow_schema, to_struct
from .worker import TaskSpec, Worker, WorkerOptions

CONF_PREFIX = "spark.workerbridge."
_inference_ids = itertools.count(1)

# option name -> (default, conf key suffix or None)
OPTIONS: dict[str, tuple[Any, Optional[str]]] = {
    "context": (None, None),
    "sample_rows": (10, "sampleRows"),
    "python": (None, "python"),
    "rscript": ("Rscript", "rscript"),
    "timeout": (None, "timeout"),
    "connect_timeout": (60.0, "connectTimeout"),
    "env": (None, None),
    "input": ("pandas", None),
    "packages": (None, None),
    "int64": ("double", None),
    "partition_index_param": (None, None),
    "name": (None, None),
}


def spark_apply(df, f: Union[Callable, R], schema: Any = None, **options: Any):
    """Apply ``f`` to every partition of ``df`` in a child process; a lazy DataFrame.

    ``f`` is a Python callable or ``R("function(df) ...")``.  It receives the
    whole partition as a pandas DataFrame (an R data.frame), or
    ``f(df, context)`` when it takes two arguments.  ``schema`` is a DDL string,
    a ``StructType`` or a ``pyarrow.Schema``; when ``None`` it is inferred by
    running ``f`` on ``sample_rows`` input rows in a child on the driver.

    Options (defaults may be set as ``spark.workerbridge.<confKey>``): see
    ``OPTIONS`` and the README's option table.

    >>> out = spark_apply(df, lambda d: d.assign(y=d.x * 2))      # doctest: +SKIP
    """
    _check_dataframe(df)
    spark = df.sparkSession
    opts = _resolve_options(spark, options)
    if opts["input"] not in ("pandas", "arrow"):
        raise BadInputError(f"input= must be 'pandas' or 'arrow', not {opts['input']!r}")
    if opts["int64"] not in ("double", "character"):
        raise BadInputError(f"int64= must be 'double' or 'character', not {opts['int64']!r}")
    child_options = {"input": opts["input"], "int64": opts["int64"],
                     "partition_index_param": opts["partition_index_param"],
                     "packages": list(opts["packages"] or [])}
    if isinstance(f, R):
        f.check_syntax(opts["rscript"])
    closure = pack(f, opts["context"], child_options)
    worker_options = WorkerOptions(
        python=opts["python"], rscript=opts["rscript"],
        connect_timeout=float(opts["connect_timeout"]),
        timeout=None if opts["timeout"] is None else float(opts["timeout"]),
        env=dict(opts["env"] or {}))
    gateway = _gateway(spark)
    runtime = Runtime.collect(with_r=closure.language == R_LANG)
    base = TaskSpec(closure, runtime, None, gateway.address, worker_options)
    if schema is None:
        struct = _infer(df, base, int(opts["sample_rows"]))
    else:
        struct = to_struct(spark, schema)
    large = str(spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false")).lower()
    spec = TaskSpec(closure, runtime, spark_arrow_schema(struct, large == "true"),
                    gateway.address, worker_options)

    def apply_partition(batches):
        from workerbridge.worker import Worker, task_id_and_partition
        task_id, partition = task_id_and_partition()
        yield from Worker(spec, partition, task_id).run(batches)

    return df.mapInArrow(apply_partition, struct)


def spark_log(spark=None, filter: Optional[str] = None, n: Optional[int] = 100) -> list[str]:
    """The newest ``n`` log lines containing ``filter``, oldest first.

    >>> for line in spark_log(spark, filter="PyScript"):  # doctest: +SKIP
    ...     print(line)
    """
    spark = spark or _active_session()
    gw = Gateway.existing(_session_key(spark))
    return [] if gw is None else gw.lines(filter=filter, n=n)


def log_path(spark=None) -> Optional[str]:
    """Where the session's Gateway appends its lines."""
    gw = Gateway.existing(_session_key(spark or _active_session()))
    return None if gw is None else gw.log_path


# ---- helpers ---------------------------------------------------------------------------
def _check_dataframe(df) -> None:
    cls = type(df)
    if not (cls.__name__ == "DataFrame" and cls.__module__.startswith("pyspark.sql")):
        hint = " (a pandas DataFrame: spark.createDataFrame(pdf) first)" \
            if cls.__module__.startswith("pandas") else ""
        raise BadInputError(f"df must be a pyspark DataFrame, not {cls.__module__}.{cls.__name__}"
                            + hint)


def _resolve_options(spark, options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BadInputError(f"unknown option(s) {unknown}; spark_apply takes {sorted(OPTIONS)}")
    out = {}
    for key, (default, conf) in OPTIONS.items():
        if key in options:
            out[key] = options[key]
        elif conf is not None:
            value = spark.conf.get(CONF_PREFIX + conf, None)
            out[key] = default if value is None else value
        else:
            out[key] = default
    for key in ("timeout", "connect_timeout"):
        if out[key] is not None:
            try:
                if float(out[key]) <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise BadInputError(f"{key}= must be a positive number of seconds, "
                                    f"not {out[key]!r}") from None
    try:
        if int(out["sample_rows"]) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise BadInputError(f"sample_rows= must be a positive integer, not "
                            f"{out['sample_rows']!r}") from None
    if out["env"] is not None and not isinstance(out["env"], dict):
        raise BadInputError("env= must be a dict of environment variables")
    return out


def _infer(df, spec: TaskSpec, sample_rows: int):
    """The output schema from ``f`` run on a sample, by the same Worker, on the driver."""
    sample = df.limit(sample_rows).toArrow()
    if sample.num_rows == 0:
        raise BadInputError("cannot infer the output schema: the input has no rows to sample; "
                            "pass schema=")
    worker = Worker(spec, partition="sample", task_id=f"driver-{next(_inference_ids)}")
    batches = list(worker.run(sample.to_batches()))
    if not batches:
        raise BadInputError("cannot infer the output schema: the closure returned nothing for "
                            f"a sample of {sample.num_rows} rows; pass schema=")
    if batches[0].num_columns == 0:
        raise BadInputError("cannot infer the output schema: the closure returned no columns; "
                            "pass schema=")
    return arrow_to_struct(batches[0].schema)


def _active_session():
    from pyspark.sql import SparkSession
    spark = SparkSession.getActiveSession()
    if spark is None:
        raise BadInputError("no active SparkSession; pass spark=")
    return spark


def _session_key(spark) -> str:
    try:
        return f"app-{spark.sparkContext.applicationId}"
    except Exception:                     # Spark Connect has no SparkContext
        return f"connect-{getattr(spark, 'session_id', id(spark))}"


def _gateway(spark) -> Gateway:
    key = _session_key(spark)

    def path() -> Optional[str]:
        configured = spark.conf.get(CONF_PREFIX + "log.path", None)
        if configured:
            return configured
        local = (spark.conf.get("spark.local.dir", None) or tempfile.gettempdir()).split(",")[0]
        os.makedirs(local, exist_ok=True)
        return os.path.join(local, f"workerbridge-{key}.log")

    max_lines = int(spark.conf.get(CONF_PREFIX + "log.maxLines", "100000"))
    return Gateway.for_key(key, path, max_lines)
