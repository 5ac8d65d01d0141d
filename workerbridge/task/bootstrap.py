"""The task function Spark ships: it brings workerbridge's own code along.

Covers: the function given to ``mapInArrow``.  It is pickled *by value*
(``register_pickle_by_value``) and uses only the standard library until it has
laid out the package's files (shipped as compressed text inside the task) and
imported them, so an executor needs pyspark, pyarrow, pandas, cloudpickle and
psutil, not workerbridge.  An executor that has another workerbridge imported
or installed runs the driver's shipped code, and the task says so in the log
(version skew).  The files are laid out in a directory only this user can
write, and checked against their content hash before every use: nothing is
imported or sourced from a place another local user could have written.  Does
not cover: what a task does (``worker``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import pickle
import shutil
import stat
import sys
import tempfile
import zlib

PACKAGE = "workerbridge"
HOME_ENV = "WORKERBRIDGE_RUNTIME_HOME"


def pack_files(files: dict) -> bytes:
    return zlib.compress(json.dumps(files).encode("utf-8"), 6)


def content_digest(files: dict) -> str:
    """The hash that names a runtime: every relative path and its text, in order."""
    h = hashlib.sha256()
    for path in sorted(files):
        text = files[path]
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        h.update(path.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def private_home(base: str | None = None) -> str:
    """This user's directory for runtimes, ``<tmp>/workerbridge-<uid>`` (0700).

    Created by us; an existing one is used only when ``lstat`` shows a real
    directory owned by us with no group or other bits.  Anything else there
    (another user's directory, a symlink) is removed when we may remove it;
    when we may not, this process uses a fresh ``mkdtemp`` directory instead
    (remembered in ``WORKERBRIDGE_RUNTIME_HOME`` for the process's later tasks)."""
    remembered = os.environ.get(HOME_ENV)
    if base is None and remembered and unsafe_dir(remembered) is None:
        return remembered
    parent = base or tempfile.gettempdir()
    problem = unsafe_parent(parent)
    if problem is not None:
        raise RuntimeError(f"workerbridge: no safe place for the runtime: {problem}; "
                           "point TMPDIR at a directory others cannot write to")
    home = os.path.join(parent, f"workerbridge-{os.getuid()}")
    for _ in range(3):
        try:
            os.mkdir(home, 0o700)
        except FileExistsError:
            pass
        if unsafe_dir(home) is None:
            return home
        if not _discard(home):
            break
    home = tempfile.mkdtemp(prefix=f"workerbridge-{os.getuid()}-", dir=parent)  # 0700, new
    if base is None:
        os.environ[HOME_ENV] = home
    return home


def unsafe_parent(path: str) -> str | None:
    """Why ``path`` cannot hold our directory (others may rename in it), or None."""
    st = _stat(path, os.stat)
    if isinstance(st, str):
        return st
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{path} is writable by others and not sticky"
    return None


def unsafe_dir(path: str) -> str | None:
    """Why ``path`` is not a private directory of ours (``lstat``), or None."""
    st = _stat(path, os.lstat)
    if isinstance(st, str):
        return st
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory" + (" (a symlink)" if stat.S_ISLNK(st.st_mode) else "")
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):o}; group/other bits are set"
    return None


def _stat(path: str, how):
    try:
        return how(path)
    except OSError as e:
        return f"{path}: {e.strerror}"


def check_runtime(root: str, digest: str) -> str | None:
    """Why the runtime at ``root`` may not be used, or None: every directory and
    file is ours, private, not a symlink, and the files (bytecode caches aside)
    hash to ``digest``."""
    problem = unsafe_dir(root)
    if problem is not None:
        return problem
    found = {}
    for top, dirs, names in os.walk(root):
        for d in dirs:
            problem = unsafe_dir(os.path.join(top, d))
            if problem is not None:
                return problem
        cache = os.path.basename(top) == "__pycache__"
        for n in names:
            path = os.path.join(top, n)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # no FIFO waits
            except FileNotFoundError:
                if cache:           # another process's bytecode being written and renamed
                    continue
                return f"{path}: vanished"
            except OSError as e:
                return f"{path}: {e.strerror}"
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                    return f"{path} is not a private regular file of ours"
                if not cache:
                    found[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    if content_digest(found) != digest:
        return f"{root}: its files do not match the shipped content hash {digest}"
    return None


VERIFIED_MODULE = "workerbridge_bootstrap_verified"


def _verified_runtimes() -> dict:
    """What this process verified: root -> (digest, metadata of every entry).
    Held by a module in sys.modules, looked up on each call: this module is
    pickled by value, so a global of its own would be a new copy every task."""
    holder = sys.modules.get(VERIFIED_MODULE)
    if holder is None:
        holder = sys.modules.setdefault(VERIFIED_MODULE, type(sys)(VERIFIED_MODULE))
    return holder.__dict__.setdefault("runtimes", {})


def _metadata(root: str) -> tuple | None:
    """Inode, mode, owner, size, mtime and ctime of root and of everything under
    it: any write to a file changes its ctime, which no user can set back."""
    out = []
    todo = [("", root)]
    try:
        while todo:
            rel, path = todo.pop()
            st = os.lstat(path)
            out.append((rel, st.st_ino, st.st_mode, st.st_uid, st.st_size,
                        st.st_mtime_ns, st.st_ctime_ns))
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(path) as it:
                    todo.extend((f"{rel}/{e.name}", e.path) for e in it)
    except OSError:
        return None
    return tuple(sorted(out))


def _still_verified(root: str, digest: str) -> bool:
    """check_runtime passes.  A runtime this process checked before, whose
    entries' metadata are unchanged since, is not read and hashed again
    (~2-5 ms a task); any change means a full check."""
    verified = _verified_runtimes()
    before = _metadata(root)
    if before is not None and verified.get(root) == (digest, before):
        return True
    if check_runtime(root, digest) is not None:
        verified.pop(root, None)
        return False
    if before is not None:                  # taken before the check: a later change is seen
        verified[root] = (digest, before)
    return True


def materialize(files, digest: str, base: str | None = None) -> str:
    """The private directory holding these files, written once per digest and
    checked (owner, mode, content hash) before every use.

    ``files`` is the dict itself or its :func:`pack_files` blob; empty when the
    caller knows the files were laid out already (then they are only checked)."""
    home = private_home(base)
    root = os.path.join(home, f"runtime-{digest}")
    if os.path.lexists(root):
        if _still_verified(root, digest):
            return root
        _discard(root)                       # ours to remove: it is in our private home
    if not files:
        raise RuntimeError(f"workerbridge runtime {root} is missing or failed its check; "
                           "the task carries no files to lay it out again")
    if isinstance(files, (bytes, bytearray)):
        files = json.loads(zlib.decompress(files).decode("utf-8"))
    staging = tempfile.mkdtemp(prefix="staging-", dir=home)
    for rel, text in files.items():
        target = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    try:
        os.rename(staging, root)             # another task may have won the race
    except OSError:
        _discard(staging)
    problem = check_runtime(root, digest)
    if problem is not None:
        raise RuntimeError(f"workerbridge runtime refused: {problem}")
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


def _discard(path: str) -> bool:
    """Remove ``path`` (a symlink itself, never its target); False when we may not."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


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
