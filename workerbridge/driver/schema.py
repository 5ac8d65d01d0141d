"""Output schemas: given (DDL, StructType, pyarrow.Schema) or inferred, and results made to fit.

Covers: turning the ``schema=`` argument into a Spark ``StructType`` and the
Arrow schema Spark expects from ``mapInArrow``; turning an inferred Arrow schema
into Spark types.
Inference itself runs the Worker on a sample (``api``): one path from closure
to result.  Results are made to fit by ``task.conform``.
"""

from __future__ import annotations

from typing import Any, Union

import pyarrow as pa

from ..wire.errors import BadInputError
from . import compat

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
    return compat.to_arrow_schema(struct, large_types)
