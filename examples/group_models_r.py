"""Per-group R models: one `lm(y ~ x)` per group, each group fitted in an RScript child.

Run with `.venv/bin/python examples/group_models_r.py` (needs Rscript on PATH).
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from local_spark import local_spark  # noqa: E402

from workerbridge import R, spark_apply, spark_log  # noqa: E402


def main() -> None:
    if shutil.which("Rscript") is None:
        print("Rscript is not on PATH: install R (Debian: apt-get install r-base-core)")
        return
    spark = local_spark("workerbridge-group-models")
    rng = np.random.default_rng(1)
    frames = [pd.DataFrame({"g": g, "x": np.arange(50.0)}) for g in ("a", "b", "c")]
    data = pd.concat(frames, ignore_index=True)
    true_slope = {"a": 0.5, "b": 2.0, "c": -1.0}
    data["y"] = data.g.map(true_slope) * data.x + rng.normal(scale=0.1, size=len(data))
    df = spark.createDataFrame(data)

    # Each group arrives whole, as one data.frame; the group column g is put in front.
    fits = spark_apply(df, R("function(d) { m <- lm(y ~ x, d); data.frame(slope = coef(m)[[2]]) }"),
                       schema="slope double", group_by="g")
    for row in fits.orderBy("g").collect():
        print(f"group {row.g}: slope {row.slope:.3f} (true {true_slope[row.g]})")
    print("\n".join(spark_log(spark, filter="RScript", n=6)))
    spark.stop()


if __name__ == "__main__":
    main()
