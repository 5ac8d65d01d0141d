"""The closure's data as pandas, and what it returns as Arrow (PyScript).

Covers: :func:`to_pandas` (an Arrow table as the DataFrame a closure gets,
integers with nulls kept exact), :func:`to_table` (every kind of value a
closure may return, as one Arrow table) and :func:`from_pandas` (a DataFrame
as Arrow, typed like the input where a column is named like one).  Does not
cover: groups (``child.groups``) or the socket (``child.python``).

Imports pyarrow and pandas lazily, as the child does, and the ``wire`` layer.
"""

from __future__ import annotations

import inspect


class ResultTypeError(TypeError):
    """The closure returned something that cannot become a table."""


def _nullable() -> dict:
    """Arrow integer and bool types -> the pandas dtype that holds them with nulls."""
    import pandas as pd
    import pyarrow as pa
    return {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
            pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
            pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
            pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(),
            pa.bool_(): pd.BooleanDtype()}


def plain_conversion(table) -> bool:
    """Whether :func:`to_pandas` converts ``table`` with Arrow's own conversion
    alone, column by column: no integer or bool column holds a null.  Then any
    slice of ``table`` converts to the same rows of the whole's conversion."""
    nullable = _nullable()
    return not any((col.null_count and col.type in nullable)
                   or _int_list_with_nulls(col, nullable) for col in table.columns)


def to_pandas(table):
    """The table as pandas, losing nothing: integer and bool columns with nulls
    become pandas' nullable dtypes (``Int64``, ``boolean``), not float or object,
    so a 64-bit integer keeps every digit."""
    import pandas as pd
    nullable = _nullable()
    # use_threads=False: one task per core is Spark's plan already; Arrow's
    # pool only adds CPU (rows x (2 long, 2 double, 1 string): 1,562 rows
    # 0.25 -> 0.11 ms, 2.5M rows 253 -> 170 ms of CPU)
    frame = table.to_pandas(deduplicate_objects=_repeats_strings(table), use_threads=False)
    for i, col in enumerate(table.columns):
        if col.null_count and col.type in nullable:
            frame.isetitem(i, col.to_pandas(types_mapper=nullable.get))
        elif _int_list_with_nulls(col, nullable):    # numpy would make the values float
            frame.isetitem(i, pd.Series(col.to_pylist(), dtype=object))
    return frame


def _repeats_strings(table) -> bool:
    """Whether pandas should share one str object per distinct value: for a
    small table, or when a string or binary column repeats enough
    (``wire.repeats``).  pyarrow's de-duplication hashes every value; on 2.5M
    distinct strings it cost 1.0 s against 0.18 s without, while on 1,000
    repeated keys it is faster (0.08 s against 0.26 s) and smaller (335 MB
    against 488 MB peak).  Either way the values are the same."""
    import pyarrow as pa

    from workerbridge.wire.repeats import SAMPLE_ROWS, repeats_enough
    if table.num_rows <= SAMPLE_ROWS:              # small (a group, say): hashing is cheap
        return True
    return any(repeats_enough(col) for col in table.columns
               if pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
               or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type))


def _int_list_with_nulls(col, nullable: dict) -> bool:
    """A list column of integers or bools with a null value inside a list."""
    import pyarrow as pa
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return False
    return col.type.value_type in nullable and \
        any(chunk.flatten().null_count for chunk in col.chunks)


def to_table(result, like=None):
    """What a closure may return, as one ``pyarrow.Table``.

    A DataFrame, Table, RecordBatch or dict of columns is a table; a list,
    tuple or generator of those is concatenated; a Series, array, list or
    scalar becomes one column named ``result``; ``None`` is no rows.
    """
    import pandas as pd
    import pyarrow as pa

    if result is None:
        return pa.table({})
    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    if isinstance(result, pd.DataFrame):
        check_columns(list(result.columns))
        if result.shape[1] == 0:                   # keep the row count of a column-less frame
            return pa.table({"_": pa.nulls(len(result))}).drop(["_"])
        return from_pandas(result, like)
    if isinstance(result, dict):
        scalars = all(pd.api.types.is_scalar(v) for v in result.values())
        return to_table(pd.DataFrame([result]) if scalars and result else pd.DataFrame(result))
    if isinstance(result, pd.Series):
        return pa.Table.from_pandas(pd.DataFrame({"result": result}), preserve_index=False)
    if isinstance(result, (list, tuple)) or inspect.isgenerator(result):
        parts = list(result)
        if parts and all(isinstance(p, (pd.DataFrame, pa.Table, pa.RecordBatch, dict)) for p in parts):
            tables = [to_table(p) for p in parts]
            return pa.concat_tables(tables, promote_options="default")
        return pa.table({"result": pa.array(parts)})
    if hasattr(result, "__array__") and getattr(result, "ndim", 1) >= 1:
        return pa.table({"result": pa.array(pd.Series(list(result) if getattr(result, "ndim", 1) > 1
                                                       else result))})
    if isinstance(result, (str, bytes, int, float, bool)) or hasattr(result, "dtype") \
            or result.__class__.__module__ in ("datetime", "decimal"):
        return pa.table({"result": pa.array([result])})
    raise ResultTypeError(
        f"the closure returned a {type(result).__module__}.{type(result).__qualname__}; "
        "return a pandas DataFrame, a pyarrow Table or RecordBatch, a dict of columns, "
        "a list of those, or a Series/array/list/scalar (one column named 'result')")


def from_pandas(frame, like=None):
    """A DataFrame as a Table.  An object column named like a column of the
    input schema ``like`` is converted to that column's type first (a map, a
    decimal's precision, an all-null column keep their types); inferred when
    that does not fit, as every other column is."""
    import pyarrow as pa
    hinted = {}
    if like is not None:
        for name in frame.columns:
            if frame[name].dtype == object and like.get_field_index(name) >= 0:
                try:
                    hinted[name] = pa.array(frame[name], type=like.field(name).type,
                                            from_pandas=True)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError,
                        OverflowError, TypeError, ValueError):
                    pass
    # nthreads=1: pyarrow's default starts a thread pool per call for frames
    # over 100 rows a column; rows x (2 long, 2 double, 1 string), per call:
    # 1,562 rows 1.17 -> 0.22 ms, 2.5M rows 134 -> 111 ms (the string column
    # holds the GIL, so the threads buy nothing)
    if not hinted:
        return pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
    rest = [c for c in frame.columns if c not in hinted]
    # columns= picks them without frame[rest], which copies every column it
    # keeps (2.5M rows: 0.10 s against 0.01 s)
    inferred = pa.Table.from_pandas(frame, columns=rest, preserve_index=False, nthreads=1) \
        if rest else None
    arrays = [hinted[c] if c in hinted else inferred.column(c) for c in frame.columns]
    return pa.Table.from_arrays(arrays, names=list(frame.columns))


def check_columns(names: list) -> None:
    seen = set()
    for name in names:
        if not isinstance(name, str):
            raise ResultTypeError(f"result column name {name!r} is not a string; "
                                  "name the columns of the returned DataFrame")
        if name in seen:
            raise ResultTypeError(f"result has the column name {name!r} twice")
        seen.add(name)
