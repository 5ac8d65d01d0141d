"""Columns the R child returns as it read them: named by the child, put back by the Worker.

In partition mode RScript holds the whole partition, and closures often return
some of its columns unchanged (``df$z <- f(df$x); df``, or ``df`` itself).
Writing such a column back costs the child the encoding and the socket, and
the Worker reading it: 2.5M rows x 5 columns, identity, about 0.1 s of the two
processes' CPU a task (``bench/worker_loop.py --rows 2500000 --lang r``).  So
RScript writes it as a column of type Null holding nothing, and its OUTPUT
frame's payload says which input column it is: ``{"input_columns":
{"<output position>": <input position>}}``.  The Worker keeps the batches it
sent (``SentColumns``) and puts the column back (``splice``).

RScript names a column only when it is ``identical()`` to the one it read, bit
for bit and with its attributes, and that column's Arrow type comes back
unchanged (``rscripts/arrow_ipc.R``: ``.ai_known_column``, ``.ai_ref_kind``).
The Worker checks what it is told: a named column must be of type Null, its
input position must exist, and its rows must lie within the rows sent
(``protocol.ProtocolError`` otherwise, which fails the task: nothing is made up).
"""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from ..wire.protocol import ProtocolError


def input_columns(payload: Any) -> dict[int, int]:
    """The OUTPUT payload's ``{output position: input position}`` (empty when none)."""
    if not payload:
        return {}
    refs = payload.get("input_columns") if isinstance(payload, dict) else None
    if not isinstance(refs, dict):
        raise ProtocolError(f"OUTPUT payload {payload!r} holds no input_columns object")
    try:
        return {int(k): int(v) for k, v in refs.items()}
    except (TypeError, ValueError):
        raise ProtocolError(f"OUTPUT names input columns by {refs!r}, not by positions") from None


class SentColumns:
    """The batches the Worker sent the child, as one table when asked for."""

    def __init__(self) -> None:
        self._batches: list[pa.RecordBatch] = []
        self._table: Optional[pa.Table] = None

    def add(self, batch: pa.RecordBatch) -> None:
        self._batches.append(batch)
        self._table = None

    def table(self) -> pa.Table:
        if self._table is None:
            if not self._batches:
                raise ProtocolError("the child named input columns, but no input was sent")
            self._table = pa.Table.from_batches(self._batches)
        return self._table

    def clear(self) -> None:
        self._batches, self._table = [], None


def splice(batch: pa.RecordBatch, refs: dict[int, int], sent: SentColumns,
           start: int) -> list[pa.RecordBatch]:
    """``batch`` (the output's rows ``start`` on) with each column named in
    ``refs`` replaced by the rows ``start`` on of the input column it names;
    as batches split where the sent ones were (no copies)."""
    if not refs:
        return [batch]
    if set(refs) - set(range(batch.num_columns)):
        raise ProtocolError(f"the child named output columns {sorted(refs)}, "
                            f"the output has {batch.num_columns}")
    table = sent.table()
    n = batch.num_rows
    if start + n > table.num_rows:
        raise ProtocolError(f"the child named input columns for rows {start}..{start + n - 1}, "
                            f"but {table.num_rows} rows were sent")
    columns = []
    for i, field in enumerate(batch.schema):
        j = refs.get(i)
        if j is None:
            columns.append(pa.chunked_array([batch.column(i)], field.type))
            continue
        if not pa.types.is_null(field.type) or not 0 <= j < table.num_columns:
            raise ProtocolError(f"output column {i} ({field.name!r}, {field.type}) cannot be "
                                f"input column {j} of {table.num_columns}")
        columns.append(table.column(j).slice(start, n))
    # (a batch of no rows gives no batches: nothing to send)
    return pa.Table.from_arrays(columns, names=batch.schema.names).to_batches()
