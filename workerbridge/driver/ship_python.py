"""Python code and environments that travel with a closure.

Covers, on the driver: ``python_env=`` (a relocatable ``.tar.gz`` made by a
packer such as venv-pack2 or conda-pack) checked and named by its content
hash, ready for Spark to distribute; and the user's **local modules** (a
``utils.py`` beside the script, anything imported from outside the
interpreter's stdlib and site-packages), registered with cloudpickle's
``register_pickle_by_value`` while the closure is pickled, so that executors
without them still load it.  The executor's side (the interpreter inside an
unpacked environment) is in ``artifacts``.  Does not cover: unpacking
(``artifacts``) or distributing (``shipping``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import shutil
import site
import sys
import sysconfig
import tempfile
from typing import Iterator

import cloudpickle

from ..task.artifacts import PYTHON_ENV, SUFFIX, Artifact, private_dir
from ..wire.errors import BadInputError

OWN_PACKAGES = ("workerbridge", "pyspark", "py4j")


def env_artifact(path: str, cache: str | None = None) -> Artifact:
    """The archive at ``path`` as an :class:`Artifact` (linked into the cache under
    its hash, so two archives both called ``env.tar.gz`` never collide in Spark)."""
    if not isinstance(path, (str, os.PathLike)):
        raise BadInputError("python_env= takes the path of a .tar.gz made by venv-pack2 or "
                            "conda-pack")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"python_env={path!r}: no such file (make one with "
                            "venv-pack2: venv-pack -p /path/to/venv -o env.tar.gz)")
    if not path.endswith((".tar.gz", ".tgz", ".tar")):
        raise BadInputError(f"python_env={path!r} is not a .tar.gz archive")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    sha = h.hexdigest()
    top = private_dir(os.path.join(cache or tempfile.gettempdir(),
                                   f"workerbridge-ship-{os.getuid()}"))
    name = f"wb-{PYTHON_ENV}-{sha[:24]}.{SUFFIX}"
    copy = os.path.join(top, name)
    if not os.path.isfile(copy):
        staging = copy + f".tmp-{os.getpid()}"
        try:
            os.link(path, staging)
        except OSError:
            shutil.copyfile(path, staging)
        os.replace(staging, copy)
    return Artifact(PYTHON_ENV, name, sha[:24], sha, os.path.getsize(copy), copy,
                    f"Python environment {os.path.basename(path)}")


# ---- local modules, pickled by value ------------------------------------------------
def _installed_roots() -> list:
    paths = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    paths.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    return [os.path.realpath(p) + os.sep for p in paths if p]


_INSTALLED: dict = {}      # a module's __file__ -> whether it lies in an installed place


def _is_installed(origin: str, roots: list) -> bool:
    """Whether the file ``origin`` lies in the stdlib or a site-packages
    (remembered per path: resolving every module's path took ~40 ms a call)."""
    known = _INSTALLED.get(origin)
    if known is None:
        real = os.path.realpath(origin)
        known = any(real.startswith(r) for r in roots) or \
            any(part in real.split(os.sep) for part in ("site-packages", "dist-packages"))
        _INSTALLED[origin] = known
    return known


def local_modules() -> list:
    """Top-level names of the imported modules that live outside the interpreter's
    stdlib and site-packages (the user's own files)."""
    roots = _installed_roots()
    found = set()
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top in found or top in OWN_PACKAGES or top == "__main__" or top not in sys.modules:
            continue
        origin = getattr(module, "__file__", None)
        if not origin or _is_installed(origin, roots):
            continue
        found.add(top)
    return sorted(found)


def used_modules(obj, local: list, depth: int = 4) -> list:
    """Which of the ``local`` modules ``obj`` (a closure) refers to, following the
    globals and cells of its functions a few levels deep: for the log only."""
    seen, used, wanted = set(), set(), set(local)

    def visit(o, level):
        if id(o) in seen or level > depth:
            return
        seen.add(id(o))
        name = o.__name__ if inspect.ismodule(o) else getattr(o, "__module__", None) \
            if inspect.isfunction(o) or inspect.isclass(o) else type(o).__module__
        top = (name or "").partition(".")[0]
        if top in wanted:
            used.add(top)
        if inspect.isfunction(o):
            for value in _references(o):
                visit(value, level + 1)
        elif isinstance(o, (list, tuple, set, frozenset)):
            for value in list(o)[:100]:
                visit(value, level + 1)
        elif isinstance(o, dict):
            for value in list(o.values())[:100]:
                visit(value, level + 1)

    visit(obj, 0)
    return sorted(used)


def _references(f) -> list:
    names, stack = set(), [f.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if inspect.iscode(c))
    g = f.__globals__
    refs = [g[n] for n in names if n in g]
    for cell in f.__closure__ or ():
        with contextlib.suppress(ValueError):
            refs.append(cell.cell_contents)
    return refs + list(f.__defaults__ or ())


@contextlib.contextmanager
def by_value(enabled: bool = True) -> Iterator[list]:
    """While inside, the user's local modules pickle by value; yields their names."""
    names = local_modules() if enabled else []
    already = set(cloudpickle.list_registry_pickle_by_value())
    registered = []
    try:
        for name in names:
            if name not in already:
                cloudpickle.register_pickle_by_value(sys.modules[name])
                registered.append(sys.modules[name])
        yield names
    finally:
        for module in registered:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)
