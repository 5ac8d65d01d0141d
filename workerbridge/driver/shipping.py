"""What travels with one ``spark_apply`` besides the closure, decided on the driver.

Covers: turning ``packages=``, ``python_env=`` and ``ship=`` into the archives
to ship (``ship_r``, ``ship_python``) and the options the children need; and
handing each archive to Spark's own distribution once per session:
``SparkContext.addFile`` on a classic session, ``SparkSession.addArtifacts(...,
file=True)`` on Spark Connect.  Each shipment leaves a Gateway line saying what
it holds and its size.  Does not cover: the executor's side (``artifacts``,
the Worker), the local modules pickled by value (``ship_python.by_value``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import ship_python, ship_r
from ..task.artifacts import Artifact
from ..wire.errors import BadInputError
from ..task.supervise import format_bytes

_added: set = set()                   # (session key, file name) handed to Spark already
_added_lock = threading.Lock()


@dataclass(frozen=True)
class Plan:
    artifacts: tuple = ()
    child_options: dict = field(default_factory=dict)


def plan(spark, session_key: str, gateway, r_source: Optional[str], opts: dict) -> Plan:
    """The archives for one call, already handed to Spark.

    ``r_source`` is the R closure's code (None for a Python closure);
    ``opts`` the resolved options (``packages``, ``python_env``, ``ship``,
    ``rscript``)."""
    artifacts, child = [], {}
    if r_source is not None and opts["ship"] and opts["packages"]:
        names = [] if opts["packages"] is True else list(opts["packages"])
        scan = r_source if opts["packages"] is True else None
        t0 = time.perf_counter()
        found, missing = ship_r.resolve_cached(opts["rscript"], names, scan)
        if found:
            art = ship_r.bundle(found)
            artifacts.append(art)
            child["ship_r"] = ship_r.child_option(found)
            gateway.log(ship_r.summary(art, missing, time.perf_counter() - t0))
        elif missing:
            gateway.log(f"no R package to ship: not in the driver's R library: "
                        f"{', '.join(missing)} (the nodes must have them)")
    if opts["python_env"] is not None:
        if r_source is not None:
            raise BadInputError("python_env= is for Python closures; an R closure runs Rscript")
        if opts["python"] is not None:
            raise BadInputError("give python= (an interpreter already on every node) or "
                                "python_env= (an archive to ship), not both")
        art = ship_python.env_artifact(opts["python_env"])
        artifacts.append(art)
        gateway.log(f"shipping {art.label} ({format_bytes(art.size)}) as {art.name}")
    for art in artifacts:
        distribute(spark, session_key, art)
    return Plan(tuple(artifacts), child)


def distribute(spark, session_key: str, artifact: Artifact) -> None:
    """Hand the archive to Spark once per session; executors fetch it before a task."""
    key = (session_key, artifact.name)
    with _added_lock:
        if key in _added:
            return
        if session_key.startswith("connect-"):
            spark.addArtifacts(artifact.driver_path, file=True)
        else:
            spark.sparkContext.addFile(artifact.driver_path)
        _added.add(key)

