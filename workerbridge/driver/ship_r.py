"""R packages from the driver's library, bundled for executors that lack them.

Covers, on the driver: asking the driver's ``Rscript`` (``rscripts/deps.R``)
which of the named packages (and, for ``packages=True``, the ones the
closure's code loads with ``library()``/``require()``/``pkg::``) its library
has, with their recursive non-base dependencies; and packing them into one
``.tar.gz`` per content hash in a private cache directory, laid out as
``<pkg>/<pkg>/...`` so that each package is a library directory of its own
(the child puts only those the node lacks, or has in another version, in
front of ``.libPaths()``).  Does not cover: distributing the file
(``shipping``), unpacking it (``artifacts``), choosing what to load on the
node (``rscripts/child.R``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..task.artifacts import R_PACKAGES, SUFFIX, Artifact, private_dir
from ..wire.errors import BadInputError
from ..task.runtime import r_scripts_dir
from ..task.supervise import format_bytes


@dataclass(frozen=True)
class RPackage:
    name: str
    version: str
    lib: str                  # the driver's library directory holding it
    compiled: bool

    @property
    def path(self) -> Path:
        return Path(self.lib) / self.name


_resolved: dict = {}         # (rscript, names, source, R_LIBS*) -> (found, DESCRIPTION mtimes)


def resolve_cached(rscript: str, names: list, source: Optional[str]) -> tuple[list, list]:
    """:func:`resolve`, remembered in this process while the packages found keep their
    DESCRIPTION files (an upgrade changes them); an answer naming packages the driver
    lacks is never remembered (they may be installed next)."""
    key = (rscript, tuple(names), source,
           tuple(os.environ.get(k) for k in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE")))
    hit = _resolved.get(key)
    if hit is not None and hit[1] == _stamps(hit[0]):
        return hit[0], []
    found, missing = resolve(rscript, names, source)
    if not missing:
        _resolved[key] = (found, _stamps(found))
    return found, missing


def _stamps(packages: list) -> tuple:
    try:
        return tuple((p.path / "DESCRIPTION").stat().st_mtime_ns for p in packages)
    except OSError:
        return ()


def resolve(rscript: str, names: list, source: Optional[str]) -> tuple[list, list]:
    """(packages to ship, names the driver's library lacks).

    ``source`` is the closure's R code to scan (``packages=True``), or None."""
    exe = shutil.which(rscript)
    if exe is None:
        raise BadInputError(f"Rscript not found as {rscript!r} on the driver")
    # Not --vanilla: the driver's R as its user runs it (~/.Renviron, Rprofile files
    # that set .libPaths()); only lines starting PKG/MISSING are read back.
    argv = [exe, "--no-save", "--no-restore", str(r_scripts_dir() / "deps.R")]
    argv += (["--scan"] if source is not None else []) + list(names)
    try:
        out = subprocess.run(argv, input=(source or "").encode("utf-8"), capture_output=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        raise BadInputError("finding the R packages to ship took over 120 s") from None
    if out.returncode != 0:
        raise BadInputError("could not find the R packages to ship with the driver's R: "
                            + out.stderr.decode("utf-8", "replace")[-1500:])
    found, missing = [], []
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        cols = line.split("\t")
        if cols[0] == "PKG" and len(cols) == 5:
            found.append(RPackage(cols[1], cols[2], cols[3], cols[4] == "TRUE"))
        elif cols[0] == "MISSING" and len(cols) == 2:
            missing.append(cols[1])
    return found, missing


_digests: dict = {}          # stat signature of a package set -> content digest


def content_digest(packages: list) -> str:
    """A hash of every file of every package (path, exec bit, bytes); the files are
    read again only when a file's size or mtime changed since the last call."""
    files = []
    for pkg in sorted(packages, key=lambda p: p.name):
        for path in sorted(p for p in pkg.path.rglob("*") if p.is_file() or p.is_symlink()):
            st = path.lstat()
            files.append((pkg, path, st.st_size, st.st_mtime_ns))
    signature = tuple((p.name, p.version, str(path), size, mtime) for p, path, size, mtime in files)
    if signature in _digests:
        return _digests[signature]
    h = hashlib.sha256()
    for pkg, path, _, _ in files:
        rel = f"{pkg.name}/{path.relative_to(pkg.path).as_posix()}"
        if path.is_symlink():
            h.update(f"L{pkg.version}\0{rel}\0{os.readlink(path)}\0".encode())
            continue
        h.update(f"F{pkg.version}\0{rel}\0{os.access(path, os.X_OK):d}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    _digests[signature] = digest = h.hexdigest()[:24]
    return digest


def bundle(packages: list, cache: Optional[str] = None) -> Artifact:
    """The packages as one archive, written once per content hash."""
    digest = content_digest(packages)
    top = private_dir(os.path.join(cache or tempfile.gettempdir(),
                                   f"workerbridge-ship-{os.getuid()}"))
    path = os.path.join(top, f"wb-{R_PACKAGES}-{digest}.{SUFFIX}")
    if not os.path.isfile(path):
        fd, staging = tempfile.mkstemp(prefix=".rlib-", suffix=f".{SUFFIX}", dir=top)
        os.close(fd)
        with tarfile.open(staging, "w:gz", compresslevel=6) as tar:
            for pkg in packages:
                tar.add(str(pkg.path), arcname=f"{pkg.name}/{pkg.name}")
        os.replace(staging, path)
    sha = _file_sha256(path)
    size = os.path.getsize(path)
    label = "R packages " + ", ".join(f"{p.name} {p.version}" for p in packages)
    return Artifact(R_PACKAGES, os.path.basename(path), digest, sha, size, path, label)


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _digests[key]


def child_option(packages: list) -> dict:
    """What the R child needs to know of the shipped packages (parallel lists)."""
    return {"name": [p.name for p in packages], "version": [p.version for p in packages],
            "compiled": [p.compiled for p in packages]}


def summary(artifact: Artifact, missing: list, seconds: float) -> str:
    text = (f"shipping {artifact.label} ({format_bytes(artifact.size)}) as {artifact.name}, "
            f"prepared in {seconds:.2f} s")
    if missing:
        text += (f"; not in the driver's R library, so not shipped: {', '.join(missing)} "
                 "(the nodes must have them)")
    return text
