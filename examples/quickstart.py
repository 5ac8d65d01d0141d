"""Quickstart: a Python closure and an R closure over iris on a local Spark.

Run with `make demo` (or `.venv/bin/python examples/quickstart.py`).
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from local_spark import local_spark  # noqa: E402

from iris import iris  # noqa: E402
from workerbridge import R, spark_apply, spark_log  # noqa: E402


def main() -> None:
    spark = local_spark("workerbridge-quickstart")
    df = spark.createDataFrame(iris()).repartition(3)

    print("== Python closure: Petal_Width doubled, in a PyScript child per partition")
    out = spark_apply(df, lambda d: d.assign(Petal_Width=d.Petal_Width * 2))
    out.show(5)
    print("\n".join(spark_log(spark, filter="PyScript", n=8)))

    if shutil.which("Rscript"):
        print("\n== R closure: Petal_Width plus a gamma draw, in an RScript child per partition")
        out = spark_apply(df, R("function(row) { row$Petal_Width <- row$Petal_Width + "
                                "rgamma(nrow(row), 2); row }"))
        out.show(5)
        print("\n".join(spark_log(spark, filter="RScript", n=8)))

    print("\n== The last lines of the log, every role")
    print("\n".join(spark_log(spark, n=12)))

    import tempfile
    import workerbridge
    where = workerbridge.timeline(spark, os.path.join(tempfile.gettempdir(),
                                                      "workerbridge-quickstart-timeline.html"))
    print(f"\n== The task timeline (one bar per task, split into phases) was written to {where}")
    spark.stop()


if __name__ == "__main__":
    main()
