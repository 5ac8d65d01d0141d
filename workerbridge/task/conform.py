"""Results made to fit the output schema (pyarrow only; no Spark).

Covers: :func:`conform`, which puts a result batch into the output schema
(columns by name, types cast safely) or says exactly what does not fit.
Does not cover: settling the schema (``driver.schema``).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def conform(batch: pa.RecordBatch, want: pa.Schema) -> pa.RecordBatch:
    """``batch`` in schema ``want``; ``ValueError`` naming the column that does not fit."""
    names = batch.schema.names
    if batch.schema.equals(want):
        return batch
    if names != want.names:
        if len(names) == 1 and len(want) == 1 and names[0] == "result":
            names = want.names                       # a vector result, named by the schema
            batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
        else:
            missing = [n for n in want.names if n not in names]
            extra = [n for n in names if n not in want.names]
            if missing or extra or len(set(names)) != len(names):
                raise ValueError(
                    f"expected columns {want.names}, got {names}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unexpected {extra}" if extra else ""))
    columns = []
    for field in want:
        col = batch.column(names.index(field.name))
        if not col.type.equals(field.type):
            col = _cast(col, field)
        if not field.nullable and col.null_count:
            raise ValueError(f"column {field.name!r} is declared not null but has "
                             f"{col.null_count} nulls")
        columns.append(col)
    return pa.RecordBatch.from_arrays(columns, schema=want)


def _cast(col: pa.Array, field: pa.Field) -> pa.Array:
    target = field.type
    try:
        if pa.types.is_timestamp(target) and pa.types.is_timestamp(col.type):
            return pc.cast(col, target, safe=False)  # Spark holds microseconds
        if pa.types.is_timestamp(target) and pa.types.is_date(col.type):
            return pc.cast(pc.cast(col, pa.timestamp("us")), target)
        if pa.types.is_floating(col.type) and pa.types.is_integer(target):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        return pc.cast(col, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise ValueError(f"column {field.name!r}: expected {target}, got {col.type} "
                         f"({str(e).splitlines()[0]})") from None
