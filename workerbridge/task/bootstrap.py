"""The task function Spark ships: it brings workerbridge's own code along.

Covers: the function given to ``mapInArrow``.  It is pickled *by value*
(``register_pickle_by_value``) and uses only the standard library until it has
laid out the package's files (shipped as compressed text inside the task) and
imported them, so an executor needs pyspark, pyarrow, pandas, cloudpickle and
psutil, not workerbridge.  An executor that has another workerbridge imported
or installed runs the driver's shipped code, and the task says so in the log
(version skew).  Does not cover: what a task does (``worker``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import pickle
import sys
import tempfile
import zlib

PACKAGE = "workerbridge"


def pack_files(files: dict) -> bytes:
    return zlib.compress(json.dumps(files).encode("utf-8"), 6)


def materialize(files, digest: str, base: str | None = None) -> str:
    """The private directory (0700) holding these files, written once per digest.

    ``files`` is the dict itself or its :func:`pack_files` blob."""
    root = os.path.join(base or tempfile.gettempdir(), f"workerbridge-runtime-{os.getuid()}-{digest}")
    if os.path.isdir(root):
        return root
    if isinstance(files, (bytes, bytearray)):
        files = json.loads(zlib.decompress(files).decode("utf-8"))
    staging = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=os.path.dirname(root))
    for rel, text in files.items():
        target = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    try:
        os.rename(staging, root)             # another task may have won the race
    except OSError:
        _remove(staging)
    return root


def load(root: str, digest: str) -> tuple:
    """workerbridge imported from ``root``; and (version, place) of another
    workerbridge that this executor had imported or installed, else None."""
    current = sys.modules.get(PACKAGE)
    if current is not None and getattr(current, "_shipped_digest", None) == digest:
        return current, None
    other = None
    if current is not None:
        other = (getattr(current, "__version__", "?"),
                 os.path.dirname(getattr(current, "__file__", None) or "?"))
    else:
        found = importlib.machinery.PathFinder.find_spec(PACKAGE)
        if found is not None and found.origin:
            other = (_declared_version(found.origin), os.path.dirname(found.origin))
    # the children kept warm by the copy being replaced would wait for nothing
    pool = sys.modules.get(PACKAGE + ".task.pool")
    if pool is not None and hasattr(pool, "POOL"):
        try:
            pool.POOL.close_all()
        except Exception:       # noqa: BLE001 - an older copy's pool; its reaper ends them too
            pass
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    spec = importlib.machinery.PathFinder.find_spec(PACKAGE, [root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    module._shipped_digest = digest
    return module, other


def make_task(files_blob: bytes, digest: str, version: str, spec_blob: bytes, barrier: bool):
    """The ``mapInArrow`` function for one ``spark_apply``."""

    def workerbridge_task(batches):
        root = materialize(files_blob, digest)
        _, other = load(root, digest)
        # Lazy by design: the shipped copy's Worker, importable only once it is loaded.
        from workerbridge.task.worker import Worker
        spec = pickle.loads(spec_blob)
        task_id, partition = _task_context()
        extra = {"barrier": _barrier_info()} if barrier else None
        worker = Worker(spec, partition, task_id, extra, root=root)
        if other is not None:
            other_version, place = other
            skew = other_version != version
            worker.log.write(
                "Worker", f"this executor has workerbridge {other_version} at {place}; running "
                          f"the driver's {version} shipped with the task"
                          + (" (version skew)" if skew else ""), "WARN" if skew else "INFO")
        yield from worker.run(batches)

    return workerbridge_task


def _declared_version(init_file: str) -> str:
    """``__version__`` as written in a package's ``__init__.py``, without importing it."""
    try:
        with open(init_file, encoding="utf-8") as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("'\"")
    except (OSError, IndexError):
        pass
    return "?"


def _remove(path: str) -> None:
    for top, dirs, names in os.walk(path, topdown=False):
        for n in names:
            os.unlink(os.path.join(top, n))
        for d in dirs:
            os.rmdir(os.path.join(top, d))
    os.rmdir(path)


def _task_context() -> tuple:
    """Spark's task attempt id and partition index, or the pid and 0 outside a task."""
    # pyspark is imported here, not at the top: this module is pickled by value
    # and must import only the standard library until the task runs.
    from pyspark import TaskContext
    tc = TaskContext.get()
    if tc is None:
        return os.getpid(), 0
    return tc.taskAttemptId(), tc.partitionId()


def _barrier_info() -> dict:
    """In a barrier stage: this task's partition and every task's address."""
    from pyspark import BarrierTaskContext
    tc = BarrierTaskContext.get()
    return {"partition": tc.partitionId(), "address": [t.address for t in tc.getTaskInfos()]}
