"""The children's source files, shipped with each task and laid out on the executor.

Covers: collecting the files a child runs (the Python child, the protocol, the
R scripts) on the driver as text, and writing them once per content hash into a
private directory on the executor (``<tmp>/workerbridge-<uid>/runtime-<digest>``,
checked for owner, mode and content hash before anything there is imported or
sourced).  An executor therefore needs only an
interpreter (``python`` with pyarrow, pandas and cloudpickle, or ``Rscript``),
never an installed workerbridge, and a ``python=`` interpreter from another
venv sees only these files, not the driver's site-packages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .bootstrap import content_digest, materialize, pack_files

PACKAGE_DIR = Path(__file__).resolve().parent.parent     # workerbridge/
R_FILES = ("protocol.R", "arrow_ipc.R", "shipped.R", "child.R")
_BLOBS: dict = {}                   # digest -> the packed files


def r_scripts_dir() -> Path:
    """Where the R files are: inside the package (a wheel) or beside it (a checkout)."""
    for candidate in (PACKAGE_DIR / "rscripts", PACKAGE_DIR.parent / "rscripts"):
        if (candidate / "child.R").is_file():
            return candidate
    raise FileNotFoundError(
        f"the R child's files (rscripts/child.R) are neither in {PACKAGE_DIR} nor beside it; "
        "reinstall workerbridge")


@dataclass(frozen=True)
class Runtime:
    """Relative path → file text (every module of the package, and the R files
    for R closures), and the hash that names the directory."""

    files: dict = field(hash=False)
    digest: str = ""

    @classmethod
    def collect(cls, with_r: bool) -> "Runtime":
        """The package's files; the R files too whenever they are there (required
        when ``with_r``).  Python and R jobs thus ship the same runtime, so an
        executor keeps one loaded workerbridge, and one pool of warm children,
        when they alternate."""
        files = {f"workerbridge/{p.relative_to(PACKAGE_DIR).as_posix()}": p.read_text("utf-8")
                 for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}
        try:
            rdir = r_scripts_dir()
        except FileNotFoundError:
            if with_r:
                raise
        else:
            files.update({f"rscripts/{name}": (rdir / name).read_text("utf-8") for name in R_FILES})
        return cls(files, content_digest(files))

    def blob(self) -> bytes:
        """The files, compressed, as they travel inside the task (compressed once
        per content: ~15 ms that every spark_apply call would pay)."""
        packed = _BLOBS.get(self.digest)
        if packed is None:
            _BLOBS.clear()                   # one runtime at a time, in practice
            packed = _BLOBS[self.digest] = pack_files(self.files)
        return packed

    def materialize(self, base: str | None = None) -> Path:
        """The directory holding these files, written on first use (atomically)
        and checked before every use (``_bootstrap.check_runtime``)."""
        return Path(materialize(self.files, self.digest, base))
