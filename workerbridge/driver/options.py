"""The options of ``spark_apply``: their defaults, conf keys and checks.

Covers: :data:`OPTIONS` (name -> default and ``spark.workerbridge.*`` conf key),
resolving a call's options against the session's conf, every check made before
a job runs (:func:`check_call`, which returns a :class:`Call`), and the one
yes/no parser (:func:`parse_flag`).  Does not cover: what the options do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..task.spec import WorkerOptions
from ..task.supervise import parse_bytes
from ..wire.errors import BadInputError

CONF_PREFIX = "spark.workerbridge."

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


@dataclass(frozen=True)
class Call:
    """One checked ``spark_apply`` call."""

    opts: dict                      # every option, resolved (call, conf, default)
    group_by: list
    child_options: dict             # what the child reads
    worker_options: WorkerOptions   # what the Worker reads
    progress: Optional[bool]        # None: auto (on for a terminal)


def check_call(df, options: dict) -> Call:
    """Every check of one ``spark_apply`` call, before any job runs."""
    check_dataframe(df)
    dup = sorted({c for c in df.columns if df.columns.count(c) > 1})
    if dup:
        raise BadInputError(f"df has duplicate column names {dup}; rename them first "
                            "(for example df.toDF(*new_names))")
    opts = resolve(df.sparkSession, options)
    _check_choice(opts, "input", ("pandas", "arrow"))
    _check_choice(opts, "int64", ("double", "character"))
    _check_choice(opts, "batch_mode", ("partition", "batch"))
    group_by = group_columns(df, opts["group_by"])
    if not isinstance(opts["fetch_result_as_sdf"], bool) or not isinstance(opts["barrier"], bool):
        raise BadInputError("fetch_result_as_sdf= and barrier= take True or False")
    index = opts["partition_index_param"]
    if index is not None and (not isinstance(index, str) or not index.isidentifier()):
        raise BadInputError("partition_index_param= must be a parameter name, like 'index'")
    if opts["batch_mode"] == "batch" and group_by:
        raise BadInputError("batch_mode='batch' cannot be combined with group_by=: "
                            "a group is always given whole")
    if opts["barrier"] and group_by:
        raise BadInputError("barrier=True cannot be combined with group_by=")
    if opts["name"] is not None and not isinstance(opts["name"], str):
        raise BadInputError("name= must be a string")
    return Call(opts, group_by, _child_options(opts, group_by), _worker_options(opts),
                parse_flag("progress", opts["progress"], allow_auto=True))


def _check_choice(opts: dict, key: str, choices: tuple) -> None:
    if opts[key] not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        raise BadInputError(f"{key}= must be {allowed}, not {opts[key]!r}")


def _child_options(opts: dict, group_by: list) -> dict:
    """The options the child reads (they travel in the closure)."""
    return {"input": opts["input"], "int64": opts["int64"],
            "partition_index_param": opts["partition_index_param"],
            "packages": package_names(opts["packages"]), "group_by": group_by,
            "batch_mode": opts["batch_mode"]}


def _worker_options(opts: dict) -> WorkerOptions:
    return WorkerOptions(
        python=opts["python"], rscript=opts["rscript"],
        connect_timeout=float(opts["connect_timeout"]),
        timeout=None if opts["timeout"] is None else float(opts["timeout"]),
        memory_limit=memory_limit(opts["memory_limit"]),
        reuse=parse_flag("reuse", opts["reuse"]), idle_timeout=float(opts["idle_timeout"]),
        env=dict(opts["env"] or {}))


def check_dataframe(df) -> None:
    cls = type(df)
    if not (cls.__name__ == "DataFrame" and cls.__module__.startswith("pyspark.sql")):
        hint = " (a pandas DataFrame: spark.createDataFrame(pdf) first)" \
            if cls.__module__.startswith("pandas") else ""
        raise BadInputError(f"df must be a pyspark DataFrame, not {cls.__module__}.{cls.__name__}"
                            + hint)


def resolve(spark, options: dict) -> dict:
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


def parse_flag(name: str, value, allow_auto: bool = False) -> Optional[bool]:
    """The one yes/no parser of options and conf keys: True/False, "true"/"yes"/"1",
    "false"/"no"/"0"; with ``allow_auto`` also None, "auto" or "" for None.

    >>> parse_flag("reuse", "yes"), parse_flag("progress", "auto", allow_auto=True)
    (True, None)
    """
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if allow_auto and text in ("", "auto", "none"):
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    auto = ", or None (auto)" if allow_auto else ""
    raise BadInputError(f"{name}= takes True or False{auto}, not {value!r}")


def group_columns(df, group_by) -> list:
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


def memory_limit(value) -> Optional[int]:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise BadInputError(f"memory_limit= {e}") from None


def package_names(packages) -> list:
    if packages is None:
        return []
    pkgs = [packages] if isinstance(packages, str) else list(packages)
    if not all(isinstance(p, str) and p for p in pkgs):
        raise BadInputError("packages= takes a list of R package names")
    return pkgs
