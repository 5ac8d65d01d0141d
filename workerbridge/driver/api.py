"""The public API: ``spark_apply`` and ``spark_log``.

Covers: ``spark_apply`` as its steps: check the call (``options``), pack the
closure (``closure``), settle the output schema (given, or inferred by running
the same Worker on a sample in a child on the driver), and wire the task into
``mapInArrow``; reading the session's lines back (``spark_log``, ``timeline``).
Does not cover: what happens inside a task (``task.worker``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Union

import cloudpickle

from .. import __version__
from ..diagnostics.profiling import ProfileSummary, summarize
from ..diagnostics.progress import attach as attach_progress
from ..diagnostics.tasks import tasks_from_events
from ..diagnostics.timeline import write_timeline
from ..task import bootstrap
from ..task.runtime import Runtime
from ..task.spec import R_LANG, TaskSpec
from ..task.worker import Worker
from ..wire.errors import BadInputError
from ..wire.logline import SAMPLE_ID_BASE
from .closure import R, pack
from . import compat, ship_python, shipping
from .options import Call, check_call, parse_flag
from .schema import arrow_to_struct, spark_arrow_schema, to_struct
from . import sparklogs
from .session import active_session, existing_gateway, session_gateway, session_key

# The task function travels by value (with the package's files inside it), so
# executors need no workerbridge installed.  PySpark pickles with its own copy
# of cloudpickle; register with both.
cloudpickle.register_pickle_by_value(bootstrap)
try:
    from pyspark import cloudpickle as _spark_cloudpickle
    _spark_cloudpickle.register_pickle_by_value(bootstrap)
except ImportError:                       # pragma: no cover - pyspark is a dependency
    pass
_inference_ids = itertools.count(SAMPLE_ID_BASE + 1)   # log ids of schema samples

UNIT_COLUMNS = ("__wb_partition", "__wb_unit")


def spark_apply(df, f: Union[Callable, R], schema: Any = None, **options: Any):
    """Apply ``f`` to every partition of ``df`` in a child process; a lazy DataFrame.

    ``f`` is a Python callable or ``R("function(df) ...")``.  It receives the
    whole partition as a pandas DataFrame (an R data.frame), or
    ``f(df, context)`` when it takes two arguments.  ``schema`` is a DDL string,
    a ``StructType`` or a ``pyarrow.Schema``; when ``None`` it is inferred by
    running ``f`` on ``sample_rows`` input rows in a child on the driver.

    Options (defaults may be set as ``spark.workerbridge.<confKey>``): see
    ``driver.options.OPTIONS`` and the README's option table.

    >>> out = spark_apply(df, lambda d: d.assign(y=d.x * 2))      # doctest: +SKIP
    """
    compat.require_pyspark()
    call = check_call(df, options)
    gateway = session_gateway(df.sparkSession)
    closure, shipped = _ship_and_pack(df.sparkSession, f, call, gateway)
    attach_progress(gateway, df.sparkSession, call.progress)
    runtime = Runtime.collect(with_r=closure.language == R_LANG)
    struct = _settle_schema(df, schema, call, closure, runtime, gateway, shipped.artifacts)
    if not call.opts["fetch_result_as_sdf"]:
        # options travel in the TASK message, not in the pickle: no second cloudpickle
        closure = dataclasses.replace(closure, options=dict(closure.options, tag_units=True))
        struct = _with_unit_columns(struct)
    out = _wire(df, call, closure, runtime, struct, gateway, shipped.artifacts)
    return out if call.opts["fetch_result_as_sdf"] else _fetch_units(out)


def _ship_and_pack(spark, f, call: Call, gateway):
    """What travels besides the closure (handed to Spark), then the closure packed
    with the user's local modules by value.  ``packages=True`` ships what the code
    loads and has the child load nothing more."""
    if isinstance(f, R):
        f.check_syntax(call.opts["rscript"])
    wanted = call.child_options["packages"]
    opts = dict(call.opts, packages=wanted, ship=parse_flag("ship", call.opts["ship"]))
    shipped = shipping.plan(spark, session_key(spark), gateway,
                            f.source if isinstance(f, R) else None, opts)
    child_options = dict(call.child_options, packages=[] if wanted is True else wanted,
                         **shipped.child_options)
    with ship_python.by_value(opts["ship"] and not isinstance(f, R)) as local:
        closure = pack(f, opts["context"], child_options)
    used = ship_python.used_modules(f, local) if local else []
    if used:
        gateway.log(f"closure carries local modules by value: {', '.join(used)}")
    return closure, shipped


def _settle_schema(df, schema, call: Call, closure, runtime: Runtime, gateway, ship: tuple):
    """The output StructType: given, or inferred on a sample; group columns first."""
    if schema is None:
        spec = TaskSpec(closure, runtime.digest, None, gateway.address, call.worker_options,
                        call.opts["name"], ship=ship)
        struct = _infer(df, spec, str(runtime.materialize()), int(call.opts["sample_rows"]))
    else:
        struct = to_struct(df.sparkSession, schema)
    return _groups_first(struct, df.schema, call.group_by) if call.group_by else struct


def _wire(df, call: Call, closure, runtime: Runtime, struct, gateway, ship: tuple):
    """The ``mapInArrow`` of the task function, which carries the package's files
    itself (compressed); the spec inside it names only their digest."""
    spark = df.sparkSession
    large = str(spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false")).lower()
    name = call.opts["name"]
    spec = TaskSpec(closure, runtime.digest, spark_arrow_schema(struct, large == "true"),
                    gateway.address, call.worker_options, name, ship=ship,
                    input_names=tuple(df.columns))
    task = bootstrap.make_task(runtime.blob(), runtime.digest, __version__,
                               cloudpickle.dumps(spec), call.opts["barrier"])
    if name:
        task.__name__ = task.__qualname__ = _identifier(name)
    source = _placeholder_named(df, call.group_by)
    return source.mapInArrow(task, struct, barrier=call.opts["barrier"])


def spark_log(spark=None, filter: Optional[str] = None, n: Optional[int] = 100) -> list[str]:
    """The newest ``n`` log lines containing ``filter``, oldest first.

    >>> for line in spark_log(spark, filter="PyScript"):  # doctest: +SKIP
    ...     print(line)
    """
    spark = spark or active_session()
    gw = existing_gateway(spark)
    events = [] if gw is None else gw.events()
    if sparklogs.enabled(spark):        # Spark 4.1+: lines from executors no Gateway hears
        events = sparklogs.merge(events, sparklogs.worker_lines(spark))
    found = [ln for _, ln in events if filter is None or filter in ln]
    return found if n is None else found[-n:] if n > 0 else []


def log_path(spark=None) -> Optional[str]:
    """Where the session's Gateway appends its lines."""
    gw = existing_gateway(spark)
    return None if gw is None else gw.log_path


def profile(spark=None, since: Optional[float] = None, top: int = 15,
            show: bool = True) -> ProfileSummary:
    """Print (``show``) and return the summed profiles of this session's
    ``profile=True`` tasks; ``since`` (epoch seconds) keeps tasks started then or later.

    >>> workerbridge.profile(spark)                          # doctest: +SKIP
    workerbridge profile: 2 tasks, 0.612 s of task wall time
    ...
    """
    gw = existing_gateway(spark)
    tasks = tasks_from_events(gw.events() if gw is not None else [])
    summary = summarize([t for t in tasks if since is None or t.start >= since], top)
    if show:
        print(summary)
    return summary


def timeline(spark=None, path: str = "timeline.html", since: Optional[float] = None,
             include_driver: bool = True) -> str:
    """Write the session's task timeline to ``path`` (``.html``, or ``.png`` with
    matplotlib); the path written.

    ``since`` (epoch seconds) keeps only tasks that started then or later;
    ``include_driver=False`` leaves out schema inference on the driver.

    >>> workerbridge.timeline(spark, "timeline.png")          # doctest: +SKIP
    'timeline.png'
    """
    gw = existing_gateway(spark)
    tasks = tasks_from_events(gw.events() if gw is not None else [])
    tasks = [t for t in tasks if (since is None or t.start >= since)
             and (include_driver or not t.on_driver)]
    return write_timeline(tasks, path)


# ---- helpers ---------------------------------------------------------------------------
def _placeholder_named(df, group_by: list):
    """``df`` with its columns renamed by position to ``_wb0``, ``_wb1``, ...
    (and repartitioned by the group columns): PySpark's mapInArrow and
    repartition resolve names, which fails for a dot, a backtick or a space.
    The Worker gives the batches their real names back (``input_names``)."""
    safe = [f"_wb{i}" for i in range(len(df.columns))]
    source = df.toDF(*safe)
    if group_by:
        source = source.repartition(*[safe[df.columns.index(k)] for k in group_by])
    return source


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
    table = compat.to_arrow(out)
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


def _identifier(name: str) -> str:
    text = "".join(ch if ch.isalnum() else "_" for ch in name)
    return text if text and not text[0].isdigit() else f"_{text}"


def _infer(df, spec: TaskSpec, root: str, sample_rows: int):
    """The output schema from ``f`` run on a sample, by the same Worker, on the driver."""
    sample = compat.to_arrow(df.limit(sample_rows))
    if sample.num_rows == 0:
        raise BadInputError("cannot infer the output schema: the input has no rows to sample; "
                            "pass schema=")
    # partition 0: the closure sees a real integer index; the log lines say
    # "schema sample" and carry a number of their own (SAMPLE_ID_BASE and up)
    worker = Worker(spec, partition=0, task_id=next(_inference_ids), root=root, sample=True)
    batches = list(worker.run(sample.to_batches()))
    if not batches:
        raise BadInputError("cannot infer the output schema: the closure returned nothing for "
                            f"a sample of {sample.num_rows} rows; pass schema=")
    if batches[0].num_columns == 0:
        raise BadInputError("cannot infer the output schema: the closure returned no columns; "
                            "pass schema=")
    return _typed_like_input(arrow_to_struct(batches[0].schema), batches[0].schema, df.schema)


def _typed_like_input(struct, arrow_schema, source):
    """An all-null result column (Arrow type null: nothing to infer from) named
    like an input column takes the input column's type, not string."""
    import pyarrow as pa
    from pyspark.sql.types import StructField, StructType
    have = set(source.names)
    return StructType([
        StructField(f.name, source[f.name].dataType, True)
        if pa.types.is_null(arrow_schema.field(i).type) and f.name in have else f
        for i, f in enumerate(struct.fields)])


