"""The public API: ``spark_apply`` and ``spark_log``.

Covers: argument checks (before any job runs), packing the closure, the output
schema (given, or inferred by running the same Worker on a sample in a child on
the driver), the session's Gateway, and wiring it all into ``mapInArrow``.
Does not cover: what happens inside a task (``worker``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import tempfile
import warnings
from typing import Any, Callable, Optional, Union

import cloudpickle

from . import __version__, _bootstrap, sparklogs
from .closure import R, R_LANG, pack
from .errors import BadInputError
from .gateway import Gateway
from .privatefiles import user_dir
from .runtime import Runtime
from .supervise import parse_bytes
from .schema import arrow_to_struct, spark_arrow_schema, to_struct
from .worker import TaskSpec, Worker, WorkerOptions

CONF_PREFIX = "spark.workerbridge."

# The task function travels by value (with the package's files inside it), so
# executors need no workerbridge installed.  PySpark pickles with its own copy
# of cloudpickle; register with both.
cloudpickle.register_pickle_by_value(_bootstrap)
try:
    from pyspark import cloudpickle as _spark_cloudpickle
    _spark_cloudpickle.register_pickle_by_value(_bootstrap)
except ImportError:                       # pragma: no cover - pyspark is a dependency
    pass
_inference_ids = itertools.count(1)

# option name -> (default, conf key suffix or None)
OPTIONS: dict[str, tuple[Any, Optional[str]]] = {
    "context": (None, None),
    "sample_rows": (10, "sampleRows"),
    "python": (None, "python"),
    "rscript": ("Rscript", "rscript"),
    "timeout": (None, "timeout"),
    "memory_limit": (None, "memoryLimit"),
    "connect_timeout": (60.0, "connectTimeout"),
    "env": (None, None),
    "input": ("pandas", None),
    "packages": (None, None),
    "int64": ("double", None),
    "partition_index_param": (None, None),
    "name": (None, None),
    "group_by": (None, None),
    "fetch_result_as_sdf": (True, None),
    "barrier": (False, None),
    "progress": (None, "progress"),      # None: a live line on stderr when it is a TTY
    "batch_mode": ("partition", "batchMode"),
    "reuse": (True, "reuse"),
    "idle_timeout": (60.0, "idleTimeout"),
}
UNIT_COLUMNS = ("__wb_partition", "__wb_unit")


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
    dup = sorted({c for c in df.columns if df.columns.count(c) > 1})
    if dup:
        raise BadInputError(f"df has duplicate column names {dup}; rename them first "
                            "(for example df.toDF(*new_names))")
    spark = df.sparkSession
    opts = _resolve_options(spark, options)
    if opts["input"] not in ("pandas", "arrow"):
        raise BadInputError(f"input= must be 'pandas' or 'arrow', not {opts['input']!r}")
    if opts["int64"] not in ("double", "character"):
        raise BadInputError(f"int64= must be 'double' or 'character', not {opts['int64']!r}")
    group_by = _group_columns(df, opts["group_by"])
    fetch = opts["fetch_result_as_sdf"]
    if not isinstance(fetch, bool) or not isinstance(opts["barrier"], bool):
        raise BadInputError("fetch_result_as_sdf= and barrier= take True or False")
    if opts["partition_index_param"] is not None and (
            not isinstance(opts["partition_index_param"], str)
            or not opts["partition_index_param"].isidentifier()):
        raise BadInputError("partition_index_param= must be a parameter name, like 'index'")
    if opts["batch_mode"] not in ("partition", "batch"):
        raise BadInputError(f"batch_mode= must be 'partition' or 'batch', not {opts['batch_mode']!r}")
    if opts["batch_mode"] == "batch" and group_by:
        raise BadInputError("batch_mode='batch' cannot be combined with group_by=: "
                            "a group is always given whole")
    if opts["barrier"] and group_by:
        raise BadInputError("barrier=True cannot be combined with group_by=")
    if opts["name"] is not None and not isinstance(opts["name"], str):
        raise BadInputError("name= must be a string")
    child_options = {"input": opts["input"], "int64": opts["int64"],
                     "partition_index_param": opts["partition_index_param"],
                     "packages": _packages(opts["packages"]), "group_by": group_by,
                     "batch_mode": opts["batch_mode"]}
    if isinstance(f, R):
        f.check_syntax(opts["rscript"])
    closure = pack(f, opts["context"], child_options)
    worker_options = WorkerOptions(
        python=opts["python"], rscript=opts["rscript"],
        connect_timeout=float(opts["connect_timeout"]),
        timeout=None if opts["timeout"] is None else float(opts["timeout"]),
        memory_limit=_memory_limit(opts["memory_limit"]),
        reuse=_flag("reuse", opts["reuse"]), idle_timeout=float(opts["idle_timeout"]),
        env=dict(opts["env"] or {}))
    gateway = _gateway(spark)
    address = dataclasses.replace(gateway.address, spark_worker_logs=sparklogs.enabled(spark))
    from .progress import attach as _attach_progress
    _attach_progress(gateway, spark, opts["progress"])
    runtime = Runtime.collect(with_r=closure.language == R_LANG)
    name = opts["name"]
    if schema is None:
        base = TaskSpec(closure, runtime, None, address, worker_options, name)
        struct = _infer(df, base, int(opts["sample_rows"]))
    else:
        struct = to_struct(spark, schema)
    if group_by:
        struct = _groups_first(struct, df.schema, group_by)
    if not fetch:
        # options travel in the TASK message, not in the pickle: no second cloudpickle
        closure = dataclasses.replace(closure, options=dict(closure.options, tag_units=True))
        struct = _with_unit_columns(struct)
    large = str(spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false")).lower()
    # The task carries the package's files itself (compressed), so the spec
    # inside it names only their digest.
    spec = TaskSpec(closure, Runtime({}, runtime.digest),
                    spark_arrow_schema(struct, large == "true"), address,
                    worker_options, name)
    task = _bootstrap.make_task(runtime.blob(), runtime.digest, __version__,
                                cloudpickle.dumps(spec), opts["barrier"])
    if name:
        task.__name__ = task.__qualname__ = _identifier(name)
    source = df.repartition(*group_by) if group_by else df
    out = source.mapInArrow(task, struct, barrier=opts["barrier"])
    return out if fetch else _fetch_units(out)


def spark_log(spark=None, filter: Optional[str] = None, n: Optional[int] = 100) -> list[str]:
    """The newest ``n`` log lines containing ``filter``, oldest first.

    >>> for line in spark_log(spark, filter="PyScript"):  # doctest: +SKIP
    ...     print(line)
    """
    spark = spark or _active_session()
    gw = Gateway.existing(_session_key(spark))
    events = [] if gw is None else gw.events()
    if sparklogs.enabled(spark):        # Spark 4.1+: lines from executors no Gateway hears
        events = sparklogs.merge(events, sparklogs.worker_lines(spark))
    found = [ln for _, ln in events if filter is None or filter in ln]
    return found if n is None else found[-n:] if n > 0 else []


def log_path(spark=None) -> Optional[str]:
    """Where the session's Gateway appends its lines."""
    gw = Gateway.existing(_session_key(spark or _active_session()))
    return None if gw is None else gw.log_path


# ---- helpers ---------------------------------------------------------------------------
def _group_columns(df, group_by) -> list:
    if group_by is None:
        return []
    cols = [group_by] if isinstance(group_by, str) else \
        list(group_by) if isinstance(group_by, (list, tuple)) else None
    if not cols or not all(isinstance(c, str) for c in cols):
        raise BadInputError("group_by= takes a column name or a list of column names")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise BadInputError(f"group_by= names columns the DataFrame lacks: {missing}; "
                            f"it has {df.columns}")
    if len(set(cols)) != len(cols):
        raise BadInputError(f"group_by= names a column twice: {cols}")
    return cols


def _groups_first(struct, source, group_by: list):
    """The output schema with the group columns in front (typed as in the input)."""
    from pyspark.sql.types import StructType
    fields = {f.name: f for f in struct.fields}
    head = [fields.get(c) or source[c] for c in group_by]
    return StructType(head + [f for f in struct.fields if f.name not in group_by])


def _with_unit_columns(struct):
    from pyspark.sql.types import LongType, StructField, StructType
    clash = [c for c in UNIT_COLUMNS if c in struct.names]
    if clash:
        raise BadInputError(f"result columns {clash} are reserved by fetch_result_as_sdf=False")
    return StructType(struct.fields + [StructField(c, LongType(), False) for c in UNIT_COLUMNS])


def _fetch_units(out) -> list:
    """The per-partition (per-group) results as a list: DataFrames, or values for a
    vector result (one column named ``result``)."""
    table = out.toArrow()
    if table.num_rows == 0:
        return []
    frame = table.to_pandas()
    results = []
    for _, part in frame.groupby(list(UNIT_COLUMNS), sort=True):
        part = part.drop(columns=list(UNIT_COLUMNS)).reset_index(drop=True)
        if list(part.columns) == ["result"]:
            values = part["result"].tolist()
            results.append(values[0] if len(values) == 1 else values)
        else:
            results.append(part)
    return results


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise BadInputError(f"{name}= takes True or False, not {value!r}")


def _memory_limit(value) -> Optional[int]:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise BadInputError(f"memory_limit= {e}") from None


def _packages(packages) -> list:
    if packages is None:
        return []
    pkgs = [packages] if isinstance(packages, str) else list(packages)
    if not all(isinstance(p, str) and p for p in pkgs):
        raise BadInputError("packages= takes a list of R package names")
    return pkgs


def _identifier(name: str) -> str:
    text = "".join(ch if ch.isalnum() else "_" for ch in name)
    return text if text and not text[0].isdigit() else f"_{text}"


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
    for key in ("timeout", "connect_timeout", "idle_timeout"):
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
        # Spark Connect: spark.local.dir is the server's, not a path on this client host.
        server = None if key.startswith("connect-") else spark.conf.get("spark.local.dir", None)
        local = (server or tempfile.gettempdir()).split(",")[0]
        os.makedirs(local, exist_ok=True)
        try:
            return os.path.join(user_dir(local), f"workerbridge-{key}.log")
        except OSError as e:
            warnings.warn(f"workerbridge: no log file: {e}", stacklevel=3)
            return None

    def make() -> Gateway:
        bind, advertise = gateway_address(spark, key)
        return Gateway(path(), int(spark.conf.get(CONF_PREFIX + "log.maxLines", "100000")),
                       host=bind, port=int(spark.conf.get(CONF_PREFIX + "gateway.port", "0")),
                       max_bytes=parse_bytes(spark.conf.get(CONF_PREFIX + "log.maxBytes", "64m")),
                       advertise=advertise)

    return Gateway.for_key(key, make)


def gateway_address(spark, key: str) -> tuple[str, str]:
    """(address the Gateway binds, address Workers dial).

    ``spark.workerbridge.gateway.host`` wins; a local master keeps to 127.0.0.1; otherwise
    the addresses Spark itself gives executors for the driver (``spark.driver.bindAddress``
    and ``spark.driver.host``).  A Spark Connect client uses its own address on the
    route to the server (the server's driver address is not this process's)."""
    configured = spark.conf.get(CONF_PREFIX + "gateway.host", None)
    if configured:
        return configured, configured
    if key.startswith("connect-"):
        own = _address_towards(_connect_host(spark))
        return own, own
    master = str(spark.conf.get("spark.master", "local"))
    if master.startswith("local"):
        return "127.0.0.1", "127.0.0.1"
    host = spark.conf.get("spark.driver.host", None) or socket.gethostname()
    bind = spark.conf.get("spark.driver.bindAddress", None) or host
    return bind, host


def _connect_host(spark) -> Optional[str]:
    try:
        return str(spark.client.host).strip("[]")   # the Connect server this client dials
    except AttributeError:
        return None


def _address_towards(host: Optional[str]) -> str:
    """This machine's address on the route to ``host`` (127.0.0.1 for a local one)."""
    if not host or host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))            # a UDP connect sends nothing; it picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
