"""workerbridge: run Python and R closures over Spark data, each task in its own child.

Data flow of one partition task::

    Spark task (Spark's Python worker)            child process (PyScript / RScript)
    ┌──────────────────────────────────┐          ┌──────────────────────────────────┐
    │ Worker                           │  AUTH →  │ connect to 127.0.0.1:port        │
    │  backend socket on 127.0.0.1:0   │  HELLO → │ prove the secret (from stdin)    │
    │  Arrow batches from Spark ───────┼─ INPUT ─▶│ Arrow → pandas / data.frame      │
    │                                  │          │ f(df[, context])                 │
    │  Arrow batches to Spark ◀────────┼─OUTPUT ──│ result → Arrow                   │
    │  lifecycle lines ──┐             │ ◀─ LOG ──│                                  │
    └────────────────────┼─────────────┘          └──────────────────────────────────┘
                         ▼
               Gateway (driver) ──▶ spark_log(spark)

The public names are imported lazily, so the child can import this package
(for ``workerbridge.log``) in an interpreter that has no pyspark.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["spark_apply", "spark_log", "R", "log", "timeline", "profile", "__version__"]

_LAZY = {
    "spark_apply": ("workerbridge.api", "spark_apply"),
    "spark_log": ("workerbridge.api", "spark_log"),
    "R": ("workerbridge.closure", "R"),
    "log": ("workerbridge.userlog", "log"),
    "timeline": ("workerbridge.timeline", "timeline"),
    "profile": ("workerbridge.profiling", "profile"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workerbridge' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
