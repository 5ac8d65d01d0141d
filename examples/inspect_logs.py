"""Inspecting the lifecycle log: spark_log, the log file, parse_line and the timeline.

Run with `.venv/bin/python examples/inspect_logs.py`; then try
`workerbridge logs -n 20` and `workerbridge logs --timeline timeline.html` in a shell.
"""

import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from local_spark import local_spark  # noqa: E402

import workerbridge  # noqa: E402
from workerbridge import spark_apply, spark_log  # noqa: E402
from workerbridge.driver.api import log_path  # noqa: E402
from workerbridge.wire.logline import parse_line  # noqa: E402


def main() -> None:
    spark = local_spark("workerbridge-inspect-logs")
    df = spark.range(0, 3000, numPartitions=3)

    def slow_sum(d):
        workerbridge.log(f"summing {len(d)} ids")          # a PyClosure line
        return d.assign(total=d.id.cumsum())

    spark_apply(df, slow_sum, schema="id long, total long").count()

    print("== one task's lines (spark_log with a filter)")
    first = parse_line(spark_log(spark, filter="compute starting", n=1)[0])
    print("\n".join(spark_log(spark, filter=f"({first['id']})", n=None)))

    print("\n== lines per role, parsed with parse_line")
    roles = collections.Counter(parse_line(ln)["role"] for ln in spark_log(spark, n=None))
    for role, n in roles.most_common():
        print(f"{role:10} {n}")

    print(f"\n== the log file: {log_path(spark)}")
    print(f"   read it with: workerbridge logs --path {log_path(spark)} --filter PyClosure")

    out = os.path.join(tempfile.gettempdir(), "workerbridge-inspect-logs.html")
    print(f"\n== the timeline of these tasks: {workerbridge.timeline(spark, out)}")
    spark.stop()


if __name__ == "__main__":
    main()
