"""What a task is given: the closure payload, the Worker's options, the task spec.

Covers: :class:`Closure` (language, code bytes, context, options, content hash;
packed on the driver by ``driver.closure``), :class:`WorkerOptions` and
:class:`TaskSpec`, which is pickled once on the driver into the Spark task.
Does not cover: packing (``driver.closure``) or running (``task.worker``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from ..wire.lifecycle import language_of
from .logsink import GatewayAddress

PYTHON = "python"
R_LANG = "r"


@dataclass(frozen=True)
class Closure:
    """One serialized payload: language, code bytes, context, options, hash."""

    language: str
    code: bytes
    context_json: Optional[str] = None
    options: dict = field(default_factory=dict, hash=False)
    digest: str = ""

    @property
    def role(self) -> str:
        """The child's role in the log: PyScript or RScript."""
        return language_of(self.language).role

    @property
    def language_name(self) -> str:
        """The language's name in messages: Python or R."""
        return language_of(self.language).name


@dataclass(frozen=True)
class WorkerOptions:
    python: Optional[str] = None         # the task's own interpreter when None
    rscript: str = "Rscript"
    connect_timeout: float = 60.0        # spawn → authenticated connection
    auth_timeout: float = 10.0           # accepted connection → secret
    timeout: Optional[float] = None      # the whole task, once the child is started
    memory_limit: Optional[int] = None   # bytes of RSS, the child's whole process tree
    env: dict = field(default_factory=dict, hash=False)
    reuse: bool = False                  # keep the child warm for the next task
    idle_timeout: float = 60.0           # seconds a warm child may wait for one


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs; pickled once on the driver into the Spark closure."""

    closure: Closure
    runtime_digest: str                  # names the shipped runtime (pool key)
    out_schema: Optional[pa.Schema] = None
    gateway: Optional[GatewayAddress] = None
    options: WorkerOptions = WorkerOptions()
    name: Optional[str] = None
