"""The repeated-strings rule: does a string column repeat enough that its
values are worth making once each?

Covers: estimating a column's distinct count from its first ``SAMPLE_ROWS``
rows and the yes/no answer (at most ``MAX_DISTINCT_FRACTION`` of the rows).
Used on both sides of the wire: the Worker sends such columns to RScript
dictionary-encoded (``task.dictionary``; R's own writer applies the same rule,
``.ai_repeats`` in ``rscripts/arrow_ipc.R``), and the Python child lets pandas
share one str object per value only for them.  Needs pyarrow only.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_ROWS = 4096
MAX_DISTINCT_FRACTION = 0.5


def estimated_distinct(sample_distinct: int, sample_rows: int) -> float:
    """The distinct count of the population a uniform sample came from, by the
    birthday bound: ``s`` draws from ``k`` values repeat ``s*s / (2k)`` times,
    so ``k ~ s*s / (2 * repeats)``; no repeat at all means no estimate (inf).
    Exact enough to tell "a few thousand keys" from "every row differs"."""
    repeats = sample_rows - sample_distinct
    if repeats <= 0:
        return float("inf")
    if sample_distinct < sample_rows / 2:          # heavy repetition: the sample saw most keys
        return float(sample_distinct)
    return sample_rows * sample_rows / (2.0 * repeats)


def repeats_enough(column: pa.Array) -> bool:
    """Whether a string column is worth sending dictionary-encoded (see the rule above)."""
    n = len(column)
    if n < 2 or column.null_count == n:
        return False
    sample = column.slice(0, min(n, SAMPLE_ROWS))
    distinct = pc.count_distinct(sample, mode="only_valid").as_py()
    valid = len(sample) - sample.null_count
    return estimated_distinct(distinct, valid) <= MAX_DISTINCT_FRACTION * n
