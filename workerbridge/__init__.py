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

Layers, each a subpackage; imports point down only::

    cli.py        the workerbridge command (doctor, logs)
    driver/       spark_apply and its options, closure packing, schema, the session's Gateway
    diagnostics/  lines in, pictures out: the task model, progress, timeline
    task/         inside a Spark task: bootstrap, Worker, launch, pool, supervision, log sink
    child/        the Python child (the R child is rscripts/)
    wire/         frames, the log-line format, the lifecycle vocabulary, error types

The public names are imported lazily, so the child can import this package
(for ``workerbridge.log``) in an interpreter that has no pyspark.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["spark_apply", "spark_log", "R", "log", "timeline", "__version__"]

_LAZY = {
    "spark_apply": ("workerbridge.driver.api", "spark_apply"),
    "spark_log": ("workerbridge.driver.api", "spark_log"),
    "timeline": ("workerbridge.driver.api", "timeline"),
    "R": ("workerbridge.driver.closure", "R"),
    "log": ("workerbridge.child.userlog", "log"),
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
