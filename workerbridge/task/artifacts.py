"""Shipped archives on the executor: R package bundles and Python environments.

Covers: :class:`Artifact` (what travels inside the task: kind, the file name
Spark distributed it under, its content digest, sha256 and size, and the
driver's own copy), finding the file Spark fetched (``SparkFiles``; the
driver's copy when the task runs on the driver, for schema inference),
checking it against its sha256, and unpacking it **once per host, user and
digest** under an exclusive ``flock`` into a private directory:

    <tmp>/workerbridge-ship-<uid>/            0700, ours (lstat: no symlink, our uid)
        <kind>-<digest>.lock                  0600, the lock several executors wait on
        <kind>-<digest>/                      0700, renamed into place when complete

A directory that is not ours or not private is refused, never used.  Does not
cover: what the archives hold (beyond finding a Python environment's
interpreter and running conda-pack's ``conda-unpack`` once) or how they reached Spark (``ship_r``,
``ship_python``, ``shipping`` on the driver).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..wire.lifecycle import SHIP_REUSED, SHIP_UNPACKED
from .supervise import format_bytes

R_PACKAGES = "rlib"
PYTHON_ENV = "pyenv"
# Shipped archives are gzipped tars, but never named .tar.gz/.tgz: Spark's addFile
# would untar those into every executor's working directory as well.
SUFFIX = "wbship"


class ShipError(Exception):
    """A shipped archive cannot be found, verified or unpacked safely."""


@dataclass(frozen=True)
class Artifact:
    kind: str                 # R_PACKAGES or PYTHON_ENV
    name: str                 # the file name under SparkFiles
    digest: str               # names the unpacked directory
    sha256: str               # of the archive file
    size: int                 # bytes of the archive file
    driver_path: str          # the driver's copy
    label: str = ""           # what it holds, for the log ("R packages a 1.0, b 2.1")


@dataclass(frozen=True)
class Unpacked:
    path: str
    reused: bool              # False: this task unpacked it
    seconds: float            # waiting for the lock and unpacking
    source: str               # "SparkFiles" or "the driver's copy"


def private_dir(path: str) -> str:
    """``path`` as a directory that is ours and private (created 0700 if missing).

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> private_dir(os.path.join(d, "x")) == os.path.join(d, "x")
    True
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path)
    return path


def check_private(path: str) -> None:
    """Refuse ``path`` unless it is a real directory, owned by us, 0700 or tighter."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ShipError(f"{path} is not a directory (a symlink or a file is in its place); "
                        "remove it: workerbridge will not use it")
    if st.st_uid != os.getuid():
        raise ShipError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): "
                        "another user created it first; remove it: workerbridge will not use it")
    if st.st_mode & 0o077:
        raise ShipError(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                        "remove it or chmod 700 it: workerbridge will not use it")


def ship_base(base: Optional[str] = None) -> str:
    return private_dir(os.path.join(base or tempfile.gettempdir(),
                                    f"workerbridge-ship-{os.getuid()}"))


def locate(artifact: Artifact) -> tuple[str, str]:
    """The local archive file and where it came from."""
    try:
        from pyspark import SparkFiles   # lazy: the children import this module's kin, never pyspark
        root = SparkFiles.getRootDirectory()
    except Exception:                    # noqa: BLE001 - no SparkContext here (a bare driver)
        root = None
    if root:
        path = os.path.join(root, artifact.name)
        if os.path.isfile(path):
            return path, "SparkFiles"
    if os.path.isfile(artifact.driver_path):
        return artifact.driver_path, "the driver's copy"
    raise ShipError(f"{artifact.name} is neither among this executor's Spark files "
                    f"({root or 'none'}) nor at the driver's path {artifact.driver_path}")


def unpack(artifact: Artifact, base: Optional[str] = None,
           after: Optional[Callable[[str], None]] = None) -> Unpacked:
    """The directory holding ``artifact`` unpacked, made once under a lock.

    ``after(path)`` runs once, on the final path, before the copy is marked
    complete (conda-pack's ``conda-unpack`` rewrites prefixes there)."""
    t0 = time.monotonic()
    top = ship_base(base)
    final = os.path.join(top, f"{artifact.kind}-{artifact.digest}")
    lock_path = final + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise ShipError(f"{lock_path} belongs to another user")
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _complete(final):
            return Unpacked(final, True, time.monotonic() - t0, "")
        archive, source = locate(artifact)
        _verify(archive, artifact)
        if os.path.lexists(final):                    # an interrupted earlier attempt
            check_private(final)
            shutil.rmtree(final)
        staging = tempfile.mkdtemp(prefix=f".{artifact.kind}-{artifact.digest}.", dir=top)
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(staging, filter="tar")  # no member outside, no setuid bits
            os.chmod(staging, 0o700)
            os.rename(staging, final)
        except tarfile.TarError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise ShipError(f"{archive} cannot be unpacked: {e}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if after is not None:
            after(final)
        with open(os.path.join(final, ".workerbridge-complete"), "w") as f:
            f.write(artifact.sha256 + "\n")
        return Unpacked(final, False, time.monotonic() - t0, source)
    finally:
        os.close(fd)                                  # releases the lock


def _complete(final: str) -> bool:
    if not os.path.lexists(final):
        return False
    check_private(final)
    return os.path.isfile(os.path.join(final, ".workerbridge-complete"))


def _verify(archive: str, artifact: Artifact) -> None:
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != artifact.sha256:
        raise ShipError(f"{archive} does not match the driver's archive (sha256 "
                        f"{h.hexdigest()[:16]}, expected {artifact.sha256[:16]}); "
                        "it changed after it was shipped")


def describe(artifact: Artifact, got: Unpacked) -> str:
    """One log line: what was shipped, its size, and whether this copy was reused."""
    what = artifact.label or artifact.name
    if got.reused:
        return (f"{SHIP_REUSED}{what} ({format_bytes(artifact.size)}) at {got.path} "
                f"after {got.seconds:.2f} s")
    return (f"{SHIP_UNPACKED}{what} ({format_bytes(artifact.size)}, from {got.source}) "
            f"in {got.seconds:.2f} s into {got.path}")


def env_python(root: str) -> str:
    """The interpreter of an unpacked environment."""
    for rel in ("bin/python", "bin/python3"):
        exe = os.path.join(root, rel)
        if os.path.exists(exe):
            return exe
    raise ShipError(f"the shipped Python environment has no bin/python (unpacked at {root}); "
                    "was it made by venv-pack2 or conda-pack?")


def finish_env(root: str) -> None:
    """Run conda-pack's ``conda-unpack`` once, if the archive has one."""
    fixer = os.path.join(root, "bin", "conda-unpack")
    if os.path.isfile(fixer):
        out = subprocess.run([env_python(root), fixer], capture_output=True, timeout=600)
        if out.returncode != 0:
            raise ShipError("conda-unpack failed: " + out.stderr.decode("utf-8", "replace")[-1500:])
