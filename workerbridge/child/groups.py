"""``group_by`` in PyScript: a partition's whole groups, and their results as one table.

Covers: splitting the rows into groups by exact key codes (:func:`split_groups`),
each group's pandas frame (:func:`group_frames`), the group columns put in
front of a result that dropped them (:func:`with_keys`), and the groups'
results as one table (:func:`join_results`).  Both bulk paths give what the
per-group conversions give, or step aside: one conversion of the sorted
partition, sliced, only for small groups and when no column needs
:func:`frames.to_pandas`'s per-column fix-ups; one conversion of the
concatenated results only when they are DataFrames of the same columns and
dtypes, or dicts of scalars of the same keys and types.  Per group, each conversion cost more than a small closure (5,000
groups of 100 rows: 140 µs to pandas and 150 µs back, against 75 µs sliced,
the whole's conversion included, and 14 µs joined).  Does not cover: calling
the closure (``child.python``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from workerbridge.child.frames import check_columns, from_pandas, plain_conversion, to_pandas


@dataclass
class Groups:
    """A partition's rows in group order (a stable sort by key code), and each
    group's first row and row count."""
    ordered: object                  # pyarrow.Table
    starts: list
    counts: list

    def __len__(self) -> int:
        return len(self.starts)

    def parts(self) -> list:
        """Each group as a zero-copy slice of ``ordered``."""
        return [self.ordered.slice(a, n) for a, n in zip(self.starts, self.counts)]


def split_groups(table, keys: list) -> Groups:
    """The partition's rows split into whole groups, in order of first appearance.

    Keys are exact: each key column becomes integer codes of its values (null
    a value of its own, every NaN one value, -0.0 equal to 0.0, as in Spark's
    groupBy), never floats or text, so 2^53 and 2^53 + 1 stay apart."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    if table.num_rows == 0:
        return Groups(table, [], [])
    code = None
    for k in keys:
        codes, size = key_codes(table.column(k))
        if code is None:
            code = codes
            continue
        code = code * size + codes                        # < rows * rows: fits int64
        code = _dense_codes(pa.array(code))[0]
    # One stable sort by code (Arrow's, ~50x numpy's stable argsort on int64),
    # one take, then zero-copy slices: a take per group cost ~8x as much.
    ordered = table.take(pc.sort_indices(pa.array(code)))
    counts = np.bincount(code)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return Groups(ordered, starts.tolist(), counts.tolist())


def key_codes(col) -> tuple:
    """A key column's values as dense int64 codes 0..m-1 in order of first
    appearance, and m."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if pa.types.is_floating(col.type):
        col = pc.add(pc.if_else(pc.is_nan(col), pa.scalar(float("nan"), col.type), col),
                     pa.scalar(0.0, col.type))              # one NaN; -0.0 + 0.0 is 0.0
    try:
        return _dense_codes(col)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):   # nested types: by value
        seen: dict = {}
        values = [seen.setdefault(_hashable(v), len(seen)) for v in col.to_pylist()]
        return pa.array(values, pa.int64()).to_numpy(), len(seen)


def _dense_codes(col) -> tuple:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    enc = pc.dictionary_encode(col, null_encoding="encode")
    chunks = enc.chunks if isinstance(enc, pa.ChunkedArray) else [enc]
    if not chunks:
        return np.zeros(0, np.int64), 0
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks])
    return codes.astype(np.int64, copy=False), len(chunks[0].dictionary)


def _hashable(v):
    if isinstance(v, dict):
        return ("d",) + tuple((k, _hashable(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ("l",) + tuple(_hashable(x) for x in v)
    if isinstance(v, float) and v != v:
        return ("nan",)
    return ("v", v + 0.0 if isinstance(v, float) else v)


def with_keys(out, source, keys: list, rows=None):
    """``out`` with the group columns it lacks put in front: for its row i,
    from row ``rows[i]`` of ``source`` (by default its first row: ``source``
    is the group)."""
    import numpy as np
    import pyarrow as pa
    missing = [k for k in keys if k not in out.column_names]
    if not missing:
        return out
    at = pa.array(np.zeros(out.num_rows, np.int64) if rows is None else rows)
    cols = [source.column(k).take(at) for k in missing]
    return pa.Table.from_arrays(cols + list(out.columns), names=missing + out.column_names)


SLICE_MEAN_ROWS = 2048   # groups this large on average are converted one by one


def group_frames(groups: Groups) -> Iterator:
    """Each group's pandas frame, in order, equal to ``to_pandas(part)`` of its
    slice (values, dtypes, a fresh RangeIndex, a frame of its own): sliced from
    one conversion of the whole when the groups are small (``SLICE_MEAN_ROWS``)
    and :func:`plain_conversion` allows, else converted one by one.  Large
    groups gain nothing from slicing (a conversion's fixed cost is small
    beside their rows) and would hold the whole partition in pandas beside
    each group's copy."""
    import pandas as pd
    small = groups.ordered.num_rows <= SLICE_MEAN_ROWS * len(groups)
    if len(groups) < 2 or not small or not plain_conversion(groups.ordered):
        for part in groups.parts():
            yield to_pandas(part)
        return
    whole = to_pandas(groups.ordered)
    for start, count in zip(groups.starts, groups.counts):
        frame = whole.iloc[start:start + count].copy()    # its own: the closure may change it
        frame.index = pd.RangeIndex(count)
        yield frame


def join_results(results: list, starts: list, ordered, keys: list, like) -> Optional[object]:
    """Groups' results as one table, with the group columns a result lacks put
    in front (for ``results[i]``, from row ``starts[i]`` of ``ordered``): what
    converting each and concatenating gives, in one conversion.  The results
    are DataFrames (:func:`_frames_alike`) or dicts of scalars, one row each
    (:func:`_records_alike`).  None when that could differ, so the caller
    converts each: results of another kind or of different shapes, no rows at
    all, or a conversion that fails (converted one by one, the failing group
    is named)."""
    import numpy as np
    if not results:
        return None
    records = isinstance(results[0], dict)
    frame = _records_alike(results) if records else _frames_alike(results)
    if frame is None:
        return None
    rows = [1] * len(results) if records else [len(r) for r in results]
    if not sum(rows):
        return None
    hint = None if records else like   # to_table converts a dict without the input's hints
    try:
        check_columns(list(frame.columns))
        out = from_pandas(frame, hint)
    except Exception:                    # noqa: BLE001 - one by one names the group
        return None
    return with_keys(out, ordered, keys, np.repeat(np.asarray(starts, np.int64), rows))


def _frames_alike(results: list):
    """DataFrames of the same columns and dtypes, concatenated; else None
    (pandas' concat would make a bool 1, or a long beside a float a float)."""
    import pandas as pd
    first = results[0]
    if not isinstance(first, pd.DataFrame) or first.shape[1] == 0:
        return None
    names, dtypes = list(first.columns), list(first.dtypes)
    for r in results:
        if not isinstance(r, pd.DataFrame) or list(r.columns) != names \
                or list(r.dtypes) != dtypes:
            return None
    try:
        return pd.concat(results, ignore_index=True)
    except Exception:                    # noqa: BLE001 - duplicate names, say: one by one
        return None


def _record_types() -> tuple:
    """Scalar types whose one-row frames and many-row frames get one dtype."""
    import numpy as np
    return (bool, int, float, str, np.bool_, np.int32, np.int64, np.float32, np.float64)


def _records_alike(results: list):
    """Dicts of scalars with the same keys, each key's values of one exact
    type (ints within int64; no None, which would turn a column of ints
    float), as one DataFrame of a row each; else None."""
    import pandas as pd
    first = results[0]
    names = list(first)
    types = [type(first[k]) for k in names]
    if not names or not all(t in _record_types() for t in types):
        return None
    for r in results:
        if type(r) is not dict or list(r) != names:
            return None
        for k, t in zip(names, types):
            v = r[k]
            if type(v) is not t or (t is int and not -2**63 <= v < 2**63):
                return None
    return pd.DataFrame(results)
