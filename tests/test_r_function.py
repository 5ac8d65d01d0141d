"""The serialized R closure kind (``RFunction``, what the R package sends): a real
``Rscript`` serializes a function with its captured values, helpers and context; a
real Worker and RScript child run it (the same child warm, from its cache, keeps
the context); a payload that is no workerbridge closure fails as a ClosureError
naming it; bad payloads are refused on the driver.  No Spark: the Worker is driven directly.
"""

from __future__ import annotations

import os
import subprocess

import pyarrow as pa
import pytest

from wbtest import ROOT, RUNTIME
from workerbridge.driver.closure import RFunction, pack
from workerbridge.driver.gateway import Gateway
from workerbridge.task.pool import POOL
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker
from workerbridge.wire.errors import BadInputError, ClosureError

from test_r_codec import RSCRIPT

pytestmark = pytest.mark.skipif(not os.path.exists(RSCRIPT), reason="Rscript not installed")

# As the R package packs it: list(kind, f, context, globals), f's environment
# being `globals` (the captured values and helpers, parent: the global env).
CLOSURE = """
g <- new.env(parent = globalenv())
g$k <- 3
g$helper <- function(v) v * k
environment(g$helper) <- g
f <- function(d, ctx) { worker_log("scaling by ", k); data.frame(y = helper(d$x) + ctx$plus) }
environment(f) <- g
obj <- list(kind = "workerbridge R closure", f = f, context = list(plus = 0.5), globals = g)
"""


def r_serialize(tmp_path, code: str) -> bytes:
    """The bytes of serialize(obj, NULL) after running `code` in a fresh Rscript."""
    out = tmp_path / "payload.rds"
    script = code + f"\nwriteBin(serialize(obj, NULL), {str(out)!r})\n"
    subprocess.run([RSCRIPT, "--vanilla", "-e", script], check=True, timeout=120)
    return out.read_bytes()


def run(payload: bytes, gw: Gateway, task: str, rows=(1.0, 2.0, 3.0)) -> pa.Table:
    spec = TaskSpec(pack(RFunction(payload)), RUNTIME.digest, None, gw.address,
                    WorkerOptions(reuse=True))
    batch = pa.record_batch({"x": pa.array(rows)})
    return pa.Table.from_batches(list(Worker(spec, 0, task, root=ROOT).run(iter([batch]))))


def test_serialized_closure_runs_with_its_values_helpers_and_context(tmp_path):
    gw = Gateway(log_path=None)
    try:
        payload = r_serialize(tmp_path, CLOSURE)
        first = run(payload, gw, "rfn-1")
        assert first.column("y").to_pylist() == [3.5, 6.5, 9.5]
        # the warm child gets an empty CLOSURE frame and reuses it, context and all
        second = run(payload, gw, "rfn-2", rows=(10.0,))
        assert second.column("y").to_pylist() == [30.5]
        assert any("reused RScript" in line for line in gw.lines(filter="Worker", n=None))
        assert sum("RClosure" in line and "scaling by 3" in line for line in gw.lines(n=None)) == 2
    finally:
        POOL.close_all()
        gw.stop()


@pytest.mark.parametrize("code, expected", [
    ("obj <- 42", "does not hold a closure serialized by the workerbridge R package"),
    ("obj <- list(kind = 'workerbridge R closure', f = 1)", "does not hold a closure"),
])
def test_a_payload_that_is_no_closure_is_a_closure_error(tmp_path, code, expected):
    gw = Gateway(log_path=None)
    try:
        with pytest.raises(ClosureError, match="could not load the serialized closure: "
                                               f".*{expected}") as info:
            run(r_serialize(tmp_path, code), gw, "rfn-bad")
        assert "partition 0" in str(info.value) and "RScript (R)" in str(info.value)
    finally:
        POOL.close_all()
        gw.stop()


def test_bad_payloads_are_refused_on_the_driver():
    with pytest.raises(BadInputError, match="serialize"):
        RFunction(b"function(d) d")
    with pytest.raises(BadInputError, match="carries its context inside it"):
        pack(RFunction(b"X\n\0\0"), context={"a": 1})
    assert pack(RFunction(b"X\n\0\0")).options == {"closure_format": "serialized"}
