"""PyScript's bulk group paths give exactly what converting each group gives.

``group_frames`` slices one pandas conversion of the sorted partition, and
``join_results`` converts a run of groups' results at once; the oracle for
both is the per-group conversion they replace (``to_pandas`` of each group's
Arrow slice; ``to_table`` of each result, ``with_keys``, then one
``concat_tables``).  Generated tables hold every kind of column whose pandas
conversion has a special case: integers and bools with and without nulls,
lists of integers with nulls inside, floats with NaN, strings with nulls,
dictionaries, time-zone timestamps, dates and decimals.  No Spark: these are
the child's own functions, run as the child runs them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workerbridge.child.frames import plain_conversion, to_pandas, to_table
from workerbridge.child.groups import group_frames, join_results, split_groups, with_keys

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


COLUMNS = {
    "i64": lambda nulls: (pa.int64(), st.integers(-2**63, 2**63 - 1), nulls),
    "i8": lambda nulls: (pa.int8(), st.integers(-128, 127), nulls),
    "b": lambda nulls: (pa.bool_(), st.booleans(), nulls),
    "f": lambda nulls: (pa.float64(), st.floats(allow_nan=True, allow_infinity=True), nulls),
    "s": lambda nulls: (pa.string(), st.text(max_size=5), nulls),
    "ts": lambda nulls: (pa.timestamp("us", tz="Europe/Paris"),
                         st.datetimes(dt.datetime(1970, 1, 1), dt.datetime(2100, 1, 1),
                                      timezones=st.just(dt.timezone.utc)), nulls),
    "d": lambda nulls: (pa.date32(), st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31)), nulls),
    "dec": lambda nulls: (pa.decimal128(10, 3),
                          st.decimals(-10**6, 10**6, places=3, allow_nan=False), nulls),
    "li": lambda nulls: (pa.list_(pa.int64()),
                         st.lists(st.one_of(st.none(), st.integers(-5, 5)) if nulls
                                  else st.integers(-5, 5), max_size=3), False),
}


@st.composite
def tables(draw):
    rows = draw(st.integers(0, 40))
    # null keys make the key column a nullable one: half the tables have none
    key = st.one_of(st.none(), st.integers(0, 4)) if draw(st.booleans()) else st.integers(0, 4)
    keys = draw(st.lists(key, min_size=rows, max_size=rows))
    cols, names = [pa.array(keys, pa.int64())], ["k"]
    for name in draw(st.lists(st.sampled_from(sorted(COLUMNS)), min_size=1, max_size=4,
                              unique=True)):
        typ, values, nulls = COLUMNS[name](draw(st.booleans()))
        vals = draw(st.lists(st.one_of(st.none(), values) if nulls else values,
                             min_size=rows, max_size=rows))
        cols.append(pa.array(vals, typ))
        names.append(name)
    if draw(st.booleans()):
        cols.append(pa.array(draw(st.lists(st.sampled_from(["x", "y", None]), min_size=rows,
                                           max_size=rows)), pa.string()).dictionary_encode())
        names.append("cat")
    return pa.Table.from_arrays(cols, names=names)


@SETTINGS
@given(tables())
def test_group_frames_are_the_groups_own_conversions(table):
    groups = split_groups(table, ["k"])
    got = list(group_frames(groups))
    want = [to_pandas(part) for part in groups.parts()]
    assert len(got) == len(want) == len(groups)
    for g, w in zip(got, want):
        pd.testing.assert_frame_equal(g, w, check_exact=True)
        assert isinstance(g.index, pd.RangeIndex) and g.index.start == 0


def test_a_group_frame_is_its_own_frame():
    """A closure may change its group's frame, as the child runs it (the next
    group not yet made): no SettingWithCopyWarning, and the next groups are
    as they were (each group's frame is a copy, not a view of the whole)."""
    table = pa.table({"k": [0, 1, 0, 1], "x": [1.0, 2.0, 3.0, 4.0]})
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for frame in group_frames(split_groups(table, ["k"])):
            seen.append(frame["x"].tolist())
            frame.loc[0, "x"] = 99.0
            frame["y"] = 1
    assert seen == [[1.0, 3.0], [2.0, 4.0]]


CLOSURES = {
    "identity": lambda d: d,
    "head": lambda d: d.head(1),
    "none of it": lambda d: d.iloc[0:0],
    "one row, keys dropped": lambda d: pd.DataFrame({"n": [len(d)], "m": [float(len(d))]}),
    # the frames differ in dtypes: one by one, which refuses these (pandas'
    # concat would make True 1 and 2^53 + 1 a float)
    "int or float by group": lambda d: pd.DataFrame({"v": [2**53 + 1] if len(d) % 2 else [1.5]}),
    "bool or int by group": lambda d: pd.DataFrame({"v": [True] if len(d) % 2 else [2]}),
    # columns that differ by group: one by one
    "columns by group": lambda d: pd.DataFrame({"a" if len(d) % 2 else "b": [len(d)]}),
    # dicts of scalars, a row each
    "dict": lambda d: {"n": len(d), "m": float(len(d)) / 3, "s": f"g{len(d)}",
                       "b": bool(len(d) % 2), "f": np.float32(len(d)), "i": np.int64(-len(d))},
    "dict, NaN": lambda d: {"m": float("nan") if len(d) % 2 else 1.0},
    # one by one: a None beside ints, a bool beside an int, an int past int64
    "dict, None by group": lambda d: {"n": None if len(d) % 2 else len(d)},
    "dict, bool or int by group": lambda d: {"n": True if len(d) % 2 else len(d)},
    "dict, huge int": lambda d: {"n": 2**64 + len(d)},
    "dict, keys by group": lambda d: {"a" if len(d) % 2 else "b": len(d)},
}


# dict closures whose results are alike in shape yet are converted one by one
ONE_BY_ONE = {"dict, None by group", "dict, bool or int by group", "dict, huge int"}


def per_group(results, groups, keys, like):
    """The oracle: what PyScript did for every group before the bulk path."""
    parts = []
    for part, result in zip(groups.parts(), results):
        out = to_table(result, like=like)
        if out.num_rows:
            parts.append(with_keys(out, part, keys))
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


@SETTINGS
@given(tables(), st.sampled_from(sorted(CLOSURES)))
def test_join_results_is_the_per_group_conversion(table, closure):
    groups = split_groups(table, ["k"])
    results = [CLOSURES[closure](d) for d in group_frames(groups)]
    try:
        want = per_group(results, groups, ["k"], table.schema)
    except Exception:                           # noqa: BLE001 - any refusal counts
        want = "fails"
    got = join_results(results, groups.starts, groups.ordered, ["k"], table.schema)
    if got is None:              # stepped aside: only where the results differ, or no rows
        shapes = {(tuple(r), tuple(type(v) for v in r.values())) if isinstance(r, dict)
                  else (tuple(r.columns), tuple(str(t) for t in r.dtypes)) for r in results}
        assert len(shapes) > 1 or want is None or want == "fails" or closure in ONE_BY_ONE
        return
    assert want != "fails"
    assert got.equals(want), (got, want)


def test_a_plain_partition_takes_the_bulk_paths():
    """No integer nulls, results alike: one conversion each way (the speed-up)."""
    table = pa.table({"k": [2, 1, 2, 3] * 50, "x": [0.5, 1.5, None, 3.0] * 50,
                      "s": ["a", None, "c", "d"] * 50})
    groups = split_groups(table, ["k"])
    frames = list(group_frames(groups))
    assert plain_conversion(groups.ordered) and len(frames) == 3
    got = join_results([f.head(2) for f in frames], groups.starts, groups.ordered, ["k"],
                       table.schema)
    assert got is not None and got.num_rows == 6
    assert got.column("k").to_pylist() == [2, 2, 1, 1, 3, 3]


def test_large_groups_are_converted_one_by_one():
    """Four groups of 250,000 rows: while a group is out, about its own frame
    (4 MB) is held, not the whole partition's frame (16 MB) beside it.  Held
    = what tracemalloc sees (numpy) plus Arrow's pool (a frame converted
    from Arrow may keep Arrow's buffers)."""
    rows = 1_000_000
    table = pa.table({"k": np.arange(rows) % 4, "x": np.random.default_rng(1).random(rows)})
    groups = split_groups(table, ["k"])
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        held = []
        for frame in group_frames(groups):
            held.append(tracemalloc.get_traced_memory()[0]
                        + pa.total_allocated_bytes() - arrow_before)
            del frame
    finally:
        tracemalloc.stop()
    assert len(held) == 4
    assert max(held) < 10 * 2**20, [f"{h / 2**20:.1f} MB" for h in held]


@pytest.mark.parametrize("results", [
    [{"n": None}, {"n": 2}],                     # together: a float column, [NaN, 2.0]
    [{"n": True}, {"n": 2}],                     # together: True would be 1
    [{"n": 1}, {"n": 2.5}],
    [{"n": 2**64}, {"n": 1}],
    [{"n": 1}, {"m": 1}],
    [{"n": np.float32(1)}, {"n": np.float64(1)}],
    [pd.DataFrame({"v": [True]}), pd.DataFrame({"v": [2]})],
    [pd.DataFrame({"v": [2**53 + 1]}), pd.DataFrame({"v": [1.5]})],
    [pd.DataFrame({"v": [1]}), pd.DataFrame({"w": [1]})],
])
def test_results_that_differ_in_type_or_shape_are_converted_one_by_one(results):
    table = pa.table({"k": [0, 1], "x": [1.0, 2.0]})
    groups = split_groups(table, ["k"])
    assert join_results(results, groups.starts, groups.ordered, ["k"], table.schema) is None


@pytest.mark.parametrize("value", [decimal.Decimal("1.5"), "x", None])
def test_join_results_steps_aside_for_values_that_are_not_frames(value):
    table = pa.table({"k": [0, 1], "x": [1, 2]})
    groups = split_groups(table, ["k"])
    assert join_results([value, value], groups.starts, groups.ordered, ["k"], table.schema) is None
