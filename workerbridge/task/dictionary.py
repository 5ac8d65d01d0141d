"""How string columns travel between the Worker and the R child: dictionaries, ASCII.

Covers: deciding which string columns of a partition repeat enough to be sent
to RScript dictionary-encoded (R then makes each distinct string once and
indexes it, instead of making every row's string), encoding them, and decoding
the dictionary columns RScript sends back (R factors, repeated strings) to
their plain types before they are cast to the output schema.  Does not cover:
the Python child (pandas would turn dictionaries into categoricals, which
changes what the closure sees), the codec itself (``rscripts/arrow_ipc.R``).

The rule (``wire.repeats``, shared with ``rscripts/arrow_ipc.R``'s
``.ai_repeats`` and the Python child's pandas conversion): estimate a column's
distinct count from its first rows, and encode when it is at most half the rows.  Measured (bench/worker_loop.py
--strings, 500k rows, one string column, loaded 2-core machine): R decodes
1,000 distinct keys 5-7x faster dictionary-encoded and 100,000 distinct keys
about 3x faster; a column of distinct values is slower encoded (2-3x), and
the sample keeps it plain at a cost of ~0.5 ms.

Also: each record batch sent to R names, in its custom metadata
(``protocol.ASCII_COLUMNS_KEY``), the plain string columns whose bytes are all
ASCII (``ascii_columns``), so that R need not check its strings for UTF-8 and
mark them (``nchar`` over every string: ~50 ms of a 2.5M-row task).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..wire.protocol import ASCII_COLUMNS_KEY
from ..wire.repeats import repeats_enough

def repeated_string_columns(batch: pa.RecordBatch) -> list:
    """The indices of the batch's plain string columns that repeat enough."""
    return [i for i, f in enumerate(batch.schema)
            if (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
            and repeats_enough(batch.column(i))]


def encoded_schema(schema: pa.Schema, columns: list) -> pa.Schema:
    """``schema`` with ``columns`` as dictionaries (int32 indices) of their type."""
    for i in columns:
        f = schema.field(i)
        schema = schema.set(i, f.with_type(pa.dictionary(pa.int32(), f.type)))
    return schema


def encode_columns(batch: pa.RecordBatch, schema: pa.Schema, columns: list) -> pa.RecordBatch:
    """``batch`` with ``columns`` dictionary-encoded, in ``schema`` (from ``encoded_schema``)."""
    if not columns:
        return batch
    arrays = list(batch.columns)
    for i in columns:
        arrays[i] = pc.dictionary_encode(arrays[i])
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def decode_dictionaries(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every dictionary column replaced by its values' type."""
    if not any(pa.types.is_dictionary(t) for t in batch.schema.types):
        return batch
    arrays, fields = [], []
    for f, col in zip(batch.schema, batch.columns):
        if pa.types.is_dictionary(f.type):
            col = col.dictionary_decode()
            f = f.with_type(col.type)
        arrays.append(col)
        fields.append(f)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


def ascii_columns(batch: pa.RecordBatch) -> dict:
    """The batch's custom metadata for R: the positions of its plain string
    columns whose values' bytes are all ASCII (empty when there are none)."""
    found = []
    for i, f in enumerate(batch.schema):
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        col = batch.column(i)
        offsets, data = col.buffers()[1], col.buffers()[2]
        if len(col) and data is not None:
            offs = np.frombuffer(offsets, np.int64 if pa.types.is_large_string(f.type) else np.int32)
            values = np.frombuffer(data, np.uint8)[int(offs[col.offset]):int(offs[col.offset + len(col)])]
            if values.size and int(values.max()) >= 0x80:
                continue
        found.append(i)
    return {ASCII_COLUMNS_KEY: ",".join(map(str, found))} if found else {}
