"""The R child's heaps: started large (fewer garbage collections on the hot
path), capped by memory_limit, R's own in batch mode, the user's own when env=
sets R_VSIZE or R_NSIZE, and collected once the child sits idle in the pool."""

from __future__ import annotations

import time

import psutil
import pyarrow as pa
import pytest

from workerbridge.driver.closure import R, pack
from workerbridge.driver.gateway import Gateway
from wbtest import ROOT, RUNTIME
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker

# the vector heap's collection trigger in MB, as R itself reports it
TRIGGER = R("function(d) data.frame(mb = gc()[2L, 4L])")
# the node heap's: how many nodes (cons cells and vector headers)
NODES = R("function(d) data.frame(n = gc()[1L, 3L])")


@pytest.fixture(scope="module")
def gateway():
    gw = Gateway(log_path=None)
    yield gw
    gw.stop()


def run(gateway, f, batch_mode="partition", **options):
    spec = TaskSpec(pack(f, None, {"batch_mode": batch_mode}), RUNTIME.digest, None,
                    gateway.address, WorkerOptions(**options))
    worker = Worker(spec, 0, "heap", root=ROOT)
    table = pa.table({"x": list(range(10))})
    return worker, pa.Table.from_batches(list(worker.run(table.to_batches())))


@pytest.mark.parametrize("case, options, low, high", [
    ("default", {}, 90, 400),
    ("memory_limit caps it", {"memory_limit": 200 * 2**20}, 45, 90),
    ("batch mode keeps R's own (64 MB)", {"batch_mode": "batch"}, 0, 65),
    ("the user's R_VSIZE wins", {"env": {"R_VSIZE": "80M"}}, 70, 160),
])
def test_vector_heap_trigger(gateway, case, options, low, high):
    options = dict(options)
    _, out = run(gateway, TRIGGER, options.pop("batch_mode", "partition"), **options)
    mb = out.column("mb")[0].as_py()
    assert low <= mb < high, f"{case}: trigger {mb} MB"


@pytest.mark.parametrize("case, options, low, high", [
    # 3M nodes: a 2.5M-row partition's strings made with no collection
    ("default", {}, 3 * 2**20, 3 * 2**20 + 1),
    ("memory_limit caps it at a quarter", {"memory_limit": 200 * 2**20},
     200 * 2**20 // 4 // 56, 200 * 2**20 // 4 // 56 + 1),
    ("batch mode keeps R's own", {"batch_mode": "batch"}, 0, 1_000_000),
    ("the user's R_NSIZE wins", {"env": {"R_NSIZE": "2000000"}}, 2_000_000, 2_000_001),
    ("the user's R_VSIZE leaves the node heap ours", {"env": {"R_VSIZE": "80M"}},
     3 * 2**20, 3 * 2**20 + 1),
])
def test_node_heap_trigger(gateway, case, options, low, high):
    options = dict(options)
    _, out = run(gateway, NODES, options.pop("batch_mode", "partition"), **options)
    n = out.column("n")[0].as_py()
    assert low <= n < high, f"{case}: trigger {n} nodes"


def test_idle_warm_child_gives_its_garbage_back(gateway):
    # 320 MB of garbage left behind by the closure: more than the heap's first
    # trigger, so only the idle collection can free it before the next task
    hog = R("function(d) { x <- numeric(4e7); x[1] <- 1; d }")
    worker, out = run(gateway, hog, reuse=True)
    assert out.num_rows == 10
    proc = psutil.Process(worker.stats["child_pid"])
    try:
        after = proc.memory_info().rss
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.memory_info().rss > after - 200 * 2**20:
            time.sleep(0.1)
        assert proc.memory_info().rss <= after - 200 * 2**20, \
            f"RSS {after / 2**20:.0f} MB right after the task, {proc.memory_info().rss / 2**20:.0f} MB later"
    finally:
        from workerbridge.task.pool import POOL
        POOL.close_all()
