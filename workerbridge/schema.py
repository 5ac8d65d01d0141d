"""Output schemas: given (DDL, StructType, pyarrow.Schema) or inferred, and results made to fit.

Covers: turning the ``schema=`` argument into a Spark ``StructType`` and the
Arrow schema Spark expects from ``mapInArrow``; turning an inferred Arrow schema
into Spark types; :func:`conform`, which puts a result batch into the output
schema (columns by name, types cast safely) or says exactly what does not fit.
Inference itself runs the Worker on a sample (``api``): one path from closure
to result.
"""

from __future__ import annotations

from typing import Any, Union

import pyarrow as pa
import pyarrow.compute as pc

from .errors import BadInputError

SchemaLike = Union[str, "StructType", pa.Schema]  # noqa: F821


def to_struct(spark, schema: Any):
    """``schema=`` as a Spark ``StructType``; a clear error for what does not parse."""
    from pyspark.sql.types import StructType
    if isinstance(schema, StructType):
        struct = schema
    elif isinstance(schema, pa.Schema):
        struct = arrow_to_struct(schema)
    elif isinstance(schema, str):
        if not schema.strip():
            raise BadInputError("schema= is an empty string; give a DDL string like "
                                "'a long, b string', a StructType or a pyarrow.Schema")
        try:
            # An empty local relation: parsed by Spark itself, no job runs.
            struct = spark.createDataFrame([], schema=schema).schema
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"schema= {schema!r} does not parse as a DDL string: {first}. "
                                "Example: 'name string, n long, x double'") from None
    else:
        raise BadInputError(f"schema= must be a DDL string, a StructType or a pyarrow.Schema, "
                            f"not {type(schema).__name__}")
    if not struct.fields:
        raise BadInputError("schema= has no columns")
    names = [f.name for f in struct.fields]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"schema= names these columns more than once: {dup}")
    return struct


def arrow_to_struct(schema: pa.Schema):
    """Spark types for an Arrow schema a closure produced."""
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import StructField, StructType
    fields = []
    for f in schema:
        t = _sparkable(f.type)
        try:
            st = from_arrow_type(t, prefer_timestamp_ntz=True)
        except Exception as e:
            raise BadInputError(f"result column {f.name!r} has Arrow type {f.type}, which Spark "
                                f"cannot hold ({e}); convert it in the closure or pass schema=") \
                from None
        fields.append(StructField(f.name, st, True))
    return StructType(fields)


def _sparkable(t: pa.DataType) -> pa.DataType:
    if pa.types.is_null(t):
        return pa.string()               # an all-null column: string, as sparklyr does
    if pa.types.is_dictionary(t):
        return _sparkable(t.value_type)
    if pa.types.is_uint8(t) or pa.types.is_uint16(t):
        return pa.int32()
    if pa.types.is_uint32(t) or pa.types.is_uint64(t):
        return pa.int64()
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_date64(t):
        return pa.date32()
    return t


def spark_arrow_schema(struct, large_types: bool = False) -> pa.Schema:
    """The Arrow schema Spark expects from mapInArrow for ``struct``."""
    from pyspark.sql.pandas.types import to_arrow_schema
    return to_arrow_schema(struct, timezone="UTC", prefers_large_types=large_types)


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
