"""Everything that differs between the pyspark lines we support (3.5 and 4.x), in one place.

Covers: the installed pyspark's version; a DataFrame collected as a pyarrow Table
(``DataFrame.toArrow`` is new in 4.0; 3.5 has only its private collectors, classic
and Spark Connect); ``mapInArrow``; Spark schema -> Arrow schema (4.x takes the
session time zone and large string types, 3.5 neither); the Java versions each Spark
line runs on (for ``workerbridge doctor``); the error for a feature that needs 4.x.
Does not cover: pandas or pyarrow differences (the child copes with those itself), or
what the driver does with the results (``api``, ``schema``).

Nothing else in the package asks which pyspark it runs on: a new difference gets a
function here.

>>> parse_version("3.5.9"), parse_version("4.1.0.dev1"), parse_version("4.0.0rc2")
((3, 5, 9), (4, 1, 0), (4, 0, 0))
>>> suits_java((3, 5, 9), 17), suits_java((4, 0, 0), 11), suits_java((4, 3, 0), 21)
(True, False, True)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..wire.errors import BadInputError

if TYPE_CHECKING:                         # pyarrow is imported where it is used, so that
    import pyarrow as pa                  # ``workerbridge doctor`` can report it missing

# Oldest pyspark line supported; pyproject's dependency range says the same.
MIN_PYSPARK = (3, 5)
# Java major versions each Spark line is built and tested on (Spark's own docs:
# 3.5 runs on 8/11/17, 4.x needs 17 or 21).
JAVA_BY_SPARK = {(3, 5): (8, 11, 17), (4, 0): (17, 21), (4, 1): (17, 21), (4, 2): (17, 21),
                 (4, 3): (17, 21)}
JAVA_FOR_NEWER = (17, 21)          # a 4.x line newer than this table


def parse_version(text: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a version string like ``3.5.9`` or ``4.1.0.dev1``."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def pyspark_version() -> tuple[int, int, int]:
    """The installed pyspark's version, as ``(major, minor, patch)``."""
    import pyspark
    return parse_version(pyspark.__version__)


def is_spark4() -> bool:
    return pyspark_version() >= (4, 0, 0)


def java_majors(spark: tuple[int, int, int]) -> tuple[int, ...]:
    """The Java major versions Spark ``spark`` runs on."""
    line = spark[:2]
    if line in JAVA_BY_SPARK:
        return JAVA_BY_SPARK[line]
    return JAVA_FOR_NEWER if line > max(JAVA_BY_SPARK) else ()


def suits_java(spark: tuple[int, int, int], java_major: int) -> bool:
    return java_major in java_majors(spark)


def require_pyspark(minimum: tuple = MIN_PYSPARK, feature: str = "workerbridge") -> None:
    """A clear error when the installed pyspark is older than ``minimum`` (no feature of
    workerbridge needs more than 3.5 today; pyspark 3.4's mapInArrow has no barrier)."""
    version = pyspark_version()
    if version[:len(minimum)] < tuple(minimum):
        want = ".".join(map(str, minimum))
        raise BadInputError(f"{feature} needs pyspark {want} or newer; this driver has pyspark "
                            f"{'.'.join(map(str, version))}. Install 'pyspark>={want},<5'")


def is_connect(df) -> bool:
    """True for a Spark Connect DataFrame (in 3.5 and in 4.x)."""
    return type(df).__module__.startswith("pyspark.sql.connect")


def to_arrow(df) -> "pa.Table":
    """The whole DataFrame, collected to the driver as a pyarrow Table."""
    import pyarrow as pa
    if is_spark4():
        return df.toArrow()
    if is_connect(df):
        # 3.5 Connect: the client's own Arrow collector (what its toPandas uses); the
        # server sends at least one batch, with the schema, also for no rows.
        client = df._session.client
        table, _ = client.to_table(df._plan.to_proto(client))
        return table
    # 3.5 classic: the Arrow collector behind toPandas; no batches for no rows.
    batches = df._collect_as_arrow()
    if batches:
        return pa.Table.from_batches(batches)
    return to_arrow_schema(df.schema).empty_table()


def to_arrow_schema(struct, large_types: bool = False, timezone: str = "UTC") -> "pa.Schema":
    """The Arrow schema Spark's Arrow writer and ``mapInArrow`` use for ``struct``."""
    from pyspark.sql.pandas.types import to_arrow_schema as spark_to_arrow
    if is_spark4():
        return spark_to_arrow(struct, timezone=timezone, prefers_large_types=large_types)
    # 3.5: timestamps are always microseconds in UTC, strings never large.
    return spark_to_arrow(struct)

