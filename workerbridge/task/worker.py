"""The Worker: runs one partition task through a child process.

Covers: the backend socket (127.0.0.1, ephemeral port, one authenticated
connection), spawning the child with a per-task secret on its stdin, the
handshake, streaming Arrow batches to the child on a writer thread while the
task's thread reads the child's frames, casting the result to the output
schema, and turning every way a child can fail into a typed error that names
the partition and the language.  Reads wait on the socket and the child
process together, so a dead child is seen at once.  Does not cover: Spark
(``api`` hands it an iterator of batches), the children themselves.

The same code runs on the driver for schema inference (no output schema).
"""

from __future__ import annotations

import enum
import io
import itertools
import json
import os
import re
import secrets
import selectors
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pyarrow as pa

from ..wire import protocol as P
from ..wire.errors import R_INSTALL_HINT, ChildDiedError, ClosureError, LimitError, TaskError, TransportError
from ..wire.lifecycle import language_of, line
from ..wire.logline import level_of
from .artifacts import PYTHON_ENV, R_PACKAGES, ShipError, describe, env_python, finish_env, unpack
from .backend import accept_child, new_selector
from . import dictionary, passthrough
from .conform import conform
from .logsink import LogSink
from .pool import POOL, Link
from .spec import R_LANG, TaskSpec
from .supervise import Child, exit_name, format_bytes, tree_rss

POLL_S = 0.2
CHILD_MODULE = "workerbridge.child.python"   # run with -m; tests match it in a cmdline
COALESCE_ROWS = 100_000        # input rows joined into one batch for the child
COALESCE_BYTES = 16 * 2**20    # ... or bytes, whichever comes first
LOG_FRAME_KEEP = 1 << 20       # a LOG frame above this is read as its head only
# The Python child is started with -c, not -m: this drops the working
# directory from the front of sys.path (what -P does, for any Python 3).
PY_CHILD_MAIN = ("import runpy, sys\n"
                 "if sys.path[:1] == ['']: del sys.path[0]\n"
                 "runpy.run_module('" + CHILD_MODULE + "', run_name='__main__', "
                 "alter_sys=True)\n")


R_MIN_VSIZE = 96 * 2**20        # R's vector heap before its first collection
R_MIN_NSIZE = 3 * 2**20         # R's node count before its first collection
R_NODE_BYTES = 56               # one node (cons cell or vector header), 64-bit R


def r_heap_args(memory_limit: Optional[int], env: Optional[dict] = None) -> list:
    """Rscript flags that size R's heaps: the allocations after which R
    collects garbage, and below which it never shrinks them.

    The vector heap (R's own default: 64 MB): the codec makes little garbage
    (columns are written and read as vectors, not raw copies), so a 96 MB
    heap collects rarely: warm R task, 500k rows (bench/worker_loop.py --env
    R_VSIZE=...), child CPU and true peak RSS: 256 MB 0.15-0.16 s / 376 MB,
    128 MB 0.17 s / 236 MB, 96 MB 0.18 s / 198 MB.

    The node heap (R's own: 350,000 nodes): every string is a node, and a
    collection while a column's strings are being made visits all of them
    and all of R's string cache.  The reader makes a partition's strings at
    once, last (arrow_ipc.R, .ai_bind_string_bytes), after making room in the
    vector heap; room for the nodes can only be set here.  Without a floor R
    shrinks the node heap by a fifth at each collection that finds it mostly
    free (every collection of the numeric columns before the strings), and the
    strings then met collections three at a time.  3M nodes hold 2.5M strings
    with none: warm 2.5M-row task, fresh strings each task (bench/worker_loop.py
    --rows 2500000 --pause 0.6), child CPU 0.96 -> 0.79 s with the room, peak
    RSS 686 -> 625 MB.  The price: up to 168 MB of dead nodes before R
    collects, for a closure that makes many small objects.

    Batch mode keeps R's defaults: its point is a small footprint (8 MB
    measured a higher idle and peak RSS than the default).  A memory_limit
    caps each heap at a quarter of it; the user's own R_VSIZE or R_NSIZE
    (env=) wins for its heap."""
    env = env or {}
    quarter = None if memory_limit is None else memory_limit // 4
    args = []
    if "R_VSIZE" not in env:
        vsize = R_MIN_VSIZE if quarter is None else max(16 * 2**20, min(R_MIN_VSIZE, quarter))
        args.append(f"--min-vsize={vsize // 2**20}M")
    if "R_NSIZE" not in env:
        nsize = R_MIN_NSIZE if quarter is None else \
            max(350_000, min(R_MIN_NSIZE, quarter // R_NODE_BYTES))
        args.append(f"--min-nsize={nsize}")
    return args


class State(enum.Enum):
    """Where a Worker's task is; ``_release`` reads it to know what to end."""

    NEW = "new"                 # nothing started
    CHECKOUT = "checkout"       # taking a warm child, or starting and connecting one
    SEND = "send"               # the task's TASK/CLOSURE/INPUT frames going out
    STREAM = "stream"           # input out on the writer thread, the result coming in
    FINISH = "finish"           # DONE read: counts checked, stats logged
    POOLED = "pooled"           # the child went back to the pool (it stays alive)
    DONE = "done"               # the child was told BYE and ended


class _Gone(Exception):
    """Raised inside a read: the child exited."""


class _Upstream(Exception):
    """Raised inside a read: the writer thread's input iterator failed (``error``)."""

    def __init__(self, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class _Breach(Exception):
    """Raised inside a read: a limit was breached (``limit``, ``observed``)."""

    def __init__(self, limit: str, observed: str):
        super().__init__(f"{limit} breached: {observed}")
        self.limit, self.observed = limit, observed


class _ChildReader(io.RawIOBase):
    """Reads the socket, and between waits asks ``watch()`` whether to give up:
    so a dead child, a passed deadline or a memory breach is seen at once."""

    def __init__(self, sock: socket.socket, watch):
        self.sock, self.watch = sock, watch
        self._watched = time.monotonic()
        self._selector = new_selector()
        self._selector.register(sock, selectors.EVENT_READ)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._selector.close()
        super().close()

    def readinto(self, buf) -> int:
        while True:
            ready = self._selector.select(POLL_S)
            now = time.monotonic()
            if ready:
                # Data first: what a child said before it died still counts.
                # While data flows, the limits are still checked every POLL_S.
                if now - self._watched > POLL_S:
                    self._watched = now
                    self.watch(data_ready=True)
                return self.sock.recv_into(buf)
            self._watched = now
            self.watch(data_ready=False)


class Worker:
    """One partition task: ``Worker(spec, partition, task_id).run(batches)``."""

    def __init__(self, spec: TaskSpec, partition: object, task_id: object,
                 extra: Optional[dict] = None, *, root: str, sample: bool = False):
        self.spec = spec
        self.root = Path(root)           # the shipped runtime, laid out by the caller
        self.sample = sample             # the schema sample, run on the driver
        self.extra = dict(extra or {})
        self.closure = spec.closure
        self.partition = partition
        self.task_id = task_id
        self.role = spec.closure.role
        self.language = spec.closure.language_name
        self.log = LogSink(task_id, spec.gateway)
        self.child: Optional[Child] = None
        self.link: Optional[Link] = None         # the child's connection, once checked out
        self.writer: Optional[threading.Thread] = None
        self.state = State.NEW
        self.stats: dict = {}
        self._writer_error: Optional[BaseException] = None
        self.shipped: dict = {}              # artifact kind -> its unpacked directory
        # R, partition mode: what was sent, for the columns R names (passthrough)
        self.sent = passthrough.SentColumns()

    # ---- the task -----------------------------------------------------------------
    def run(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        try:
            it = iter(batches) if self.spec.input_names is None else \
                (pa.RecordBatch.from_arrays(b.columns, names=list(self.spec.input_names))
                 for b in batches)
            first = next((b for b in it if b.num_rows > 0), None)
            if first is None:
                self.log.write("Worker", line("empty", partition=self.partition))
                return
            label = f" for {self.spec.name!r}" if self.spec.name else ""
            label += " (schema sample)" if self.sample else ""
            self.log.write("Worker", line("start", partition=self.partition, label=label))
            yield from self._run(first, it)
        except TaskError as e:
            self.log.write("Worker", line("failed", partition=self.partition, what=e.what), "ERROR")
            e.attach_log(self.log.kept())
            raise
        finally:
            self.log.flush()

    def _run(self, first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """checkout -> send the task -> stream -> finish; ``self.state`` says
        which step the task is in, and what cleanup it needs."""
        opts = self.spec.options
        self._started = time.monotonic()
        self._deadline = self._started + opts.timeout if opts.timeout else None
        self._unpack_shipped()
        argv, env = self._command()
        key = (tuple(argv), tuple(sorted(opts.env.items())), self.spec.runtime_digest)
        try:
            self._checkout(key, argv, env)
            self._send_task()
            yield from self._stream(first, rest)
            self._finish(key)
        except GeneratorExit:
            raise
        except _Breach as e:
            raise self._limit_error(e) from None
        except BaseException as e:                    # classify what broke
            if self._writer_error is not None:        # what the child met came from upstream
                raise self._upstream_error(self._writer_error) from self._writer_error
            if isinstance(e, TaskError):
                raise
            raise self._classify(e) from e
        finally:
            self._release()

    # ---- steps ------------------------------------------------------------------------
    def _checkout(self, key: tuple, argv: list, env: dict) -> None:
        """A warm child from the pool (reuse on), else a new one, connected."""
        self.state = State.CHECKOUT
        link = POOL.take(key) if self.spec.options.reuse else None
        if link is not None:
            self.link, self.child = link, link.child
            self.log.write("Worker", line("reused", role=self.role, pid=link.child.pid,
                                            tasks=link.tasks))
        else:
            self.link = self._start(argv, env)
        self.link.reader.watch = lambda data_ready: self._watch(self._deadline, "timeout",
                                                                data_ready)

    def _send_task(self) -> None:
        """TASK, then CLOSURE (empty when the child has this closure of this job
        already), then INPUT: the Arrow stream follows on the writer thread."""
        self.state = State.SEND
        link = self.link
        P.send_json(link.conn, P.TASK, self._task_json())
        same = link.digest == self.closure.digest and link.job == self.spec.job
        P.send_frame(link.conn, P.CLOSURE, b"" if same else self.closure.code)
        P.send_frame(link.conn, P.INPUT)

    def _stream(self, first: pa.RecordBatch,
                rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Input out on the writer thread while the result comes in, until DONE."""
        self.state = State.STREAM
        self.writer = threading.Thread(target=self._write_input,
                                       args=(self.link.conn, first, rest),
                                       name="workerbridge-input", daemon=True)
        self.writer.start()
        yield from self._read_result(self.link.stream)

    def _finish(self, key: tuple) -> None:
        """Counts checked, stats logged, then the child back to the pool or ended."""
        self.state = State.FINISH
        opts, link = self.spec.options, self.link
        self._check_counts(self.writer)       # the writer has ended, or this raised
        if opts.memory_limit:                 # one last sample: short tasks never wait
            self.stats["peak_rss"] = max(self.stats.get("peak_rss", 0), tree_rss(self.child.pid))
        link.digest, link.job, link.tasks = self.closure.digest, self.spec.job, link.tasks + 1
        self.log.write("Worker", line("completed", language=self.language))
        if "peak_rss" in self.stats:
            self.log.write("Worker", f"peak RSS of the {self.role} process tree "
                                     f"{format_bytes(self.stats['peak_rss'])}")
        if opts.reuse:
            POOL.give(key, link, opts.idle_timeout)
            self.state = State.POOLED
            self.log.write("Worker", line("kept", role=self.role, pid=link.child.pid))
        else:
            P.send_frame(link.conn, P.BYE)
            self.child.close_stdin()
            self.child.wait(1.0)
            self.state = State.DONE

    def _release(self) -> None:
        """Whatever the state: a child not handed to the pool is ended (never
        reused after an error, a breach or an early stop); the writer joined."""
        if self.state is not State.POOLED:
            if self.link is not None:
                P.close_quietly(self.link.stream, self.link.conn)
            if self.child is not None:
                left = self.child.end()
                if left:
                    self.log.write("Worker", f"could not end processes {left}", "ERROR")
                self.child.release()
        if self.writer is not None:
            self.writer.join(5.0)
        self.sent.clear()

    def _start(self, argv: list, env: dict) -> Link:
        """A new child, connected and authenticated."""
        listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        try:
            secret = secrets.token_hex(P.SECRET_BYTES)
            port = listener.getsockname()[1]
            env = dict(env, **{P.ENV_PORT: str(port), P.ENV_HOST: "127.0.0.1"})
            self.child = Child(argv, env, secret)
            self.log.write("Worker", line("started", role=self.role, pid=self.child.pid))
            self.log.write("Worker", line("waiting", role=self.role, port=port))
            conn, stream = self._accept(listener, secret,
                                        self._started + self.spec.options.connect_timeout)
            return Link(self.child, conn, stream, stream.raw)
        finally:
            listener.close()                      # a second connection is refused

    def _unpack_shipped(self) -> None:
        """Each shipped archive unpacked on this host (once per digest, under a lock)."""
        for art in self.spec.ship:
            try:
                got = unpack(art, after=finish_env if art.kind == PYTHON_ENV else None)
            except (ShipError, OSError) as e:
                raise TaskError(
                    f"cannot use the shipped {art.label or art.name}: {e}",
                    partition=self.partition, language=self.language, role=self.role,
                    hint="the archive travels with Spark's addFile; see the executor's log, "
                         "or pass ship=False and install the packages on every node") from None
            self.shipped[art.kind] = got.path
            self.log.write("Worker", describe(art, got))

    def _command(self) -> tuple[list, dict]:
        """The child's argv and environment (without the port)."""
        opts = self.spec.options
        root = self.root
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in opts.env.items()})
        if self.closure.language == R_LANG:
            exe = shutil.which(opts.rscript)
            if exe is None:
                raise ChildDiedError(
                    f"Rscript not found as {opts.rscript!r}", exit_code=None, stderr_tail="",
                    partition=self.partition, language=self.language, role=self.role,
                    hint=f"{R_INSTALL_HINT} on every node, "
                         "or pass rscript='/path/to/Rscript' or set spark.workerbridge.rscript")
            heap = [] if self.closure.options.get("batch_mode") == "batch" \
                else r_heap_args(opts.memory_limit, env)
            return [exe, "--vanilla", *heap, str(root / "rscripts" / "child.R")], env
        exe = env_python(self.shipped[PYTHON_ENV]) if PYTHON_ENV in self.shipped \
            else opts.python or sys.executable
        if shutil.which(exe) is None:
            raise ChildDiedError(
                f"Python interpreter not found: {exe!r}", exit_code=None, stderr_tail="",
                partition=self.partition, language=self.language, role=self.role,
                hint="pass python= an interpreter that exists on every node and has "
                     "pyarrow, pandas and cloudpickle")
        # The runtime first (it holds only the workerbridge package), then the
        # user's own PYTHONPATH (env= or the executor's), kept.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        env.pop("PYTHONSTARTUP", None)
        return [exe, "-c", PY_CHILD_MAIN], env

    def _accept(self, listener: socket.socket, secret: str, deadline: float):
        """The first connection that proves the secret; strangers are refused
        (``backend.accept_child``: concurrent, a total deadline each, capped)."""
        refused = []

        def idle() -> None:
            if self.child.poll() is not None:
                raise self._died(f"the {self.role} child exited before connecting")
            if time.monotonic() > deadline:
                raise LimitError(
                    f"{self.role} did not connect within {self.spec.options.connect_timeout:g} s",
                    exit_code=self.child.poll(), stderr_tail=self.child.stderr_tail(),
                    partition=self.partition, language=self.language, role=self.role,
                    hint="the child may be stuck starting up; see its stderr above")

        def refuse() -> None:
            refused.append(1)
            if len(refused) == 1:
                self.log.write("Worker", "refused a backend connection without the task's secret",
                               "WARN")

        conn = accept_child(listener, secret.encode("ascii"), self.spec.options.auth_timeout,
                            POLL_S, idle, refuse)
        if len(refused) > 1:
            self.log.write("Worker", f"refused {len(refused)} backend connections in all", "WARN")
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._hello(conn, min(deadline, time.monotonic() + self.spec.options.auth_timeout))

    def _hello(self, conn: socket.socket, deadline: float):
        """HELLO from the authenticated child (by ``deadline``), then WELCOME."""
        reader = _ChildReader(conn, lambda data_ready: self._watch(deadline, "auth", data_ready))
        stream = io.BufferedReader(reader, buffer_size=1 << 20)
        try:
            hello = P.decode_json(P.expect(stream, P.HELLO, P.MAX_AUTH_BYTES))
        except _Gone:
            P.close_quietly(stream, conn)
            raise self._died(f"the {self.role} child exited before its HELLO") from None
        except (_Breach, P.ProtocolError, OSError) as e:
            P.close_quietly(stream, conn)
            raise TransportError(
                f"{self.role} proved the secret but sent no valid HELLO: {e}",
                partition=self.partition, language=self.language, role=self.role,
                detail="stderr tail:\n" + self.child.stderr_tail(),
                hint="the child's interpreter may run another workerbridge; see its stderr") from None
        if hello.get("protocol") != P.PROTOCOL_VERSION:
            P.close_quietly(stream, conn)
            raise TransportError(
                f"{self.role} speaks protocol {hello.get('protocol')}, this Worker "
                f"{P.PROTOCOL_VERSION}", partition=self.partition, language=self.language,
                role=self.role, hint="driver and executors run different workerbridge versions")
        P.send_json(conn, P.WELCOME, {"protocol": P.PROTOCOL_VERSION})
        self.stats["child_pid"] = hello.get("pid")
        return conn, stream             # the task's watch replaces the auth one in _run

    def _task_json(self) -> dict:
        msg = {"partition": self.partition, "task_id": str(self.task_id), "job": self.spec.job,
               "closure_hash": self.closure.digest, "options": self.closure.options}
        if self.closure.context_json is not None:
            msg["context"] = json.loads(self.closure.context_json)
        if R_PACKAGES in self.shipped:
            msg["r_lib"] = self.shipped[R_PACKAGES]
        if self.closure.language == R_LANG and self.spec.out_schema is not None:
            # R has no int64: an int64 column it leaves as read goes back as
            # int64, from its Arrow bytes, only where the schema wants int64
            msg["int64_out"] = [f.name for f in self.spec.out_schema if pa.types.is_int64(f.type)]
        msg.update(self.extra)
        return msg

    def _write_input(self, conn: socket.socket, first: pa.RecordBatch,
                     rest: Iterator[pa.RecordBatch]) -> None:
        """Writer thread: the partition's rows as one Arrow stream.  Never raises.

        The end-of-stream marker is written only after the last batch: when the
        input fails upstream the stream is cut (nothing more is sent, the write
        side is shut), so the child can never take part of a partition for all
        of it; the reader sees the stored error within POLL_S."""
        rows = 0
        sink = _SocketSink(conn)
        try:
            batches = self._input_batches(first, rest)
            head = next(batches)
            # R: repeated string columns go dictionary-encoded (decided on the first batch)
            to_r = self.closure.language == R_LANG
            encode = dictionary.repeated_string_columns(head) if to_r else []
            schema = dictionary.encoded_schema(head.schema, encode)
            keep = to_r and self.closure.options.get("batch_mode") != "batch"
            w = pa.ipc.new_stream(sink, schema)
            for batch in itertools.chain([head], batches):
                if keep:
                    self.sent.add(batch)
                encoded = dictionary.encode_columns(batch, schema, encode)
                w.write_batch(encoded, custom_metadata=dictionary.ascii_columns(encoded) if to_r else None)
                rows += batch.num_rows
            w.close()
            self.stats["rows_sent"] = rows
        except BaseException as e:                  # noqa: BLE001 - stored, re-raised by the reader
            sink.cut()
            # a failed send is the child's side going away: the reader meets that
            # itself (and says so); only a failure of the input is upstream
            if sink.error is None:
                self._writer_error = e
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _input_batches(self, first: pa.RecordBatch,
                       rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Spark's batches (10,000 rows by default), joined into batches of at
        least COALESCE_ROWS rows or COALESCE_BYTES bytes: the children decode
        per batch, and R pays ~2 ms a batch (bench/worker_loop.py --batch-rows).
        Batch mode keeps Spark's batches: they are what its closure is given."""
        if self.closure.options.get("batch_mode") == "batch":
            yield first
            yield from (b for b in rest if b.num_rows)
            return
        pending, rows, size = [], 0, 0
        for batch in itertools.chain([first], rest):
            if not batch.num_rows:
                continue
            pending.append(batch)
            rows, size = rows + batch.num_rows, size + batch.nbytes
            if rows >= COALESCE_ROWS or size >= COALESCE_BYTES:
                yield from joined_batches(pending)
                pending, rows, size = [], 0, 0
        if pending:
            yield from joined_batches(pending)

    def _read_result(self, stream: io.BufferedReader) -> Iterator[pa.RecordBatch]:
        lang = language_of(self.closure.language)
        allowed = {lang.role, lang.closure_role}
        while True:
            msg_type, length = P.recv_header(stream)
            if msg_type == P.LOG:
                self._child_log(stream, length, allowed)
                continue
            payload = P.read_exact(stream, length) if length else b""
            if msg_type == P.ERROR:
                raise self._closure_error(P.decode_json(payload))
            elif msg_type == P.OUTPUT:
                refs = passthrough.input_columns(P.decode_json(payload) if payload else None)
                self.stats["input_columns"] = len(refs)
                rows = 0
                reader = pa.ipc.open_stream(stream)
                for batch in reader:
                    for piece in passthrough.splice(dictionary.decode_dictionaries(batch),
                                                    refs, self.sent, rows):
                        yield self._conform(piece)
                    rows += batch.num_rows
                self.stats["rows_read"] = self.stats.get("rows_read", 0) + rows
            elif msg_type == P.DONE:
                self.stats.update(P.decode_json(payload))
                return
            else:
                raise P.ProtocolError(f"unexpected {P.MESSAGE_NAMES[msg_type]} from {self.role}")

    def _child_log(self, stream: io.BufferedReader, length: int, allowed: set) -> None:
        """One LOG frame as a line, its message capped (``P.cap_line``); a frame
        above LOG_FRAME_KEEP is read as its head only, the rest skipped unkept."""
        head = P.read_exact(stream, min(length, LOG_FRAME_KEEP)) if length else b""
        P.skip(stream, length - len(head))
        whole = len(head) == length
        rec = P.decode_json(head) if whole else _partial_log_record(head)
        role = rec.get("role") if rec.get("role") in allowed else self.role
        self.log.write(role, P.cap_line(str(rec.get("message", "")), None if whole else length),
                       level_of(rec.get("level")))

    def _check_counts(self, writer: threading.Thread) -> None:
        """After DONE: the child took every row sent and the Worker read every
        row it returned; else the task fails (Spark retries it), never short."""
        writer.join(5.0)
        if self._writer_error is not None:
            raise _Upstream(self._writer_error)
        sent, took = self.stats.get("rows_sent"), self.stats.get("rows_in")
        made, read = self.stats.get("rows_out"), self.stats.get("rows_read", 0)
        if writer.is_alive() or sent != took or (made is not None and made != read):
            raise TransportError(
                f"row counts disagree: the Worker sent {sent} rows and {self.role} took {took}; "
                f"{self.role} returned {made} and the Worker read {read}",
                partition=self.partition, language=self.language, role=self.role,
                hint="rows were lost between the Worker and its child; the task fails so "
                     "that Spark can retry it")

    # ---- results -------------------------------------------------------------------------
    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch in the output schema: columns by name, types cast safely."""
        want = self.spec.out_schema
        if want is None:
            return batch
        try:
            return conform(batch, want)
        except ValueError as e:
            raise TaskError(f"the result does not match the schema: {e}",
                            partition=self.partition, language=self.language, role=self.role,
                            hint="fix the closure's result or pass schema= matching it "
                                 "(column names and types)") from None

    # ---- errors -------------------------------------------------------------------------
    def _closure_error(self, rec: dict) -> TaskError:
        kind = rec.get("kind", "closure")
        hints = {
            "closure": "the error happened in your closure; its traceback is above",
            "unpickle": "the closure could not be loaded in the child; are the modules it "
                        "uses installed for the child's interpreter?",
            "result": "return a DataFrame, a table, a dict of columns, or a vector",
            "codec": "a column's type could not cross to or from R",
            "package": "install the R package on every node, or drop it from packages=",
        }
        tb = rec.get("traceback") or ""
        if isinstance(tb, list):
            tb = "\n".join(str(x) for x in tb)
        return ClosureError(error_type=str(rec.get("type", "Error")),
                            message=str(rec.get("message", "")), remote_traceback=tb,
                            call=rec.get("call") or None, partition=self.partition,
                            language=self.language, role=self.role,
                            hint=hints.get(kind, hints["closure"]))

    def _died(self, what: str) -> ChildDiedError:
        code = self.child.wait(1.0) if self.child is not None else None
        return ChildDiedError(
            f"{what}; exit code {exit_name(code)}", exit_code=code,
            stderr_tail=self.child.stderr_tail() if self.child else "",
            partition=self.partition, language=self.language, role=self.role,
            hint="the child crashed or was killed; its stderr tail is above "
                 "(a segfault, out of memory, or os._exit/quit() in the closure)")

    def _watch(self, deadline: Optional[float], what: str, data_ready: bool) -> None:
        """Called while a read waits: raise if the input failed upstream, the
        child died or a limit is breached."""
        if self._writer_error is not None:
            raise _Upstream(self._writer_error)
        if not data_ready and self.child.poll() is not None:
            raise _Gone(f"the child exited ({exit_name(self.child.returncode)})")
        now = time.monotonic()
        if deadline is not None and now > deadline:
            if what == "auth":
                raise _Breach("auth", "no secret in time")
            raise _Breach(f"timeout of {self.spec.options.timeout:g} s",
                          f"ran {now - self._started:.1f} s")
        limit = self.spec.options.memory_limit
        if limit:
            rss = tree_rss(self.child.pid)
            self.stats["peak_rss"] = max(self.stats.get("peak_rss", 0), rss)
            if rss > limit:
                raise _Breach(f"memory_limit of {format_bytes(limit)}",
                              f"the child's process tree used {format_bytes(rss)}")

    def _upstream_error(self, error: BaseException) -> TaskError:
        return TaskError(
            f"the partition's input failed upstream: {type(error).__name__}: {error}",
            partition=self.partition, language=self.language, role=self.role,
            hint="the error is in what feeds spark_apply (the source or an earlier step), "
                 "not in the closure; the child got no end of input, so no partial result")

    def _limit_error(self, e: _Breach) -> LimitError:
        self.log.write("Worker", f"{e.limit} breached ({e.observed}); ending {self.role}", "ERROR")
        self.child.end()
        return LimitError(
            f"{e.limit} breached: {e.observed}", exit_code=self.child.returncode,
            stderr_tail=self.child.stderr_tail(), partition=self.partition,
            language=self.language, role=self.role,
            hint="raise the limit (timeout=, memory_limit=, or spark.workerbridge.* conf keys), "
                 "or give the closure less data per partition (repartition)")

    def _classify(self, e: BaseException) -> TaskError:
        broke_protocol = isinstance(e, P.ProtocolError) and not isinstance(e, P.PeerClosed)
        if not broke_protocol and self.child is not None and self.child.wait(1.0) is not None:
            return self._died(f"the {self.role} child ended before finishing its task")
        code = self.child.poll() if self.child else None
        return TransportError(
            f"the connection to {self.role} broke: {type(e).__name__}: {e}"
            + (f" (the child then exited with {exit_name(code)})" if code is not None else ""),
            partition=self.partition, language=self.language, role=self.role,
            detail=("stderr tail:\n" + self.child.stderr_tail()) if self.child else "",
            hint="the child sent something that is not the protocol; see its stderr")


def _partial_log_record(head: bytes) -> dict:
    """Level, role and the start of the message from the head of a LOG frame's
    JSON too long to keep whole (JSON escapes in the message are left as they are)."""
    text = head.decode("utf-8", "ignore")
    rec = {k: m.group(1) for k in ("level", "role")
           if (m := re.search(rf'"{k}"\s*:\s*"(\w+)"', text))}
    m = re.search(r'"message"\s*:\s*"', text)
    rec["message"] = text[m.end():] if m else text
    return rec


def joined_batches(batches: list) -> Iterator[pa.RecordBatch]:
    """``batches`` as few batches: one, unless the joined strings would pass
    Arrow's 32-bit offsets, where Arrow splits them.  Every row is yielded,
    and a count that does not add up fails loudly."""
    if len(batches) == 1:
        yield batches[0]
        return
    want = sum(b.num_rows for b in batches)
    got = 0
    for batch in pa.Table.from_batches(batches).combine_chunks().to_batches():
        got += batch.num_rows
        yield batch
    if got != want:
        raise RuntimeError(f"joining input batches gave {got} rows, not {want}: "
                           "the task fails rather than lose rows (a workerbridge bug: please report it)")


class _SocketSink:
    """A write-only file for pyarrow's stream writer: straight to the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False
        self._cut = False
        self.error: Optional[OSError] = None    # the send to the child that failed

    def cut(self) -> None:
        """Send nothing more, whatever the writer still flushes (no end marker)."""
        self._cut = True

    def write(self, data) -> int:
        if not self._cut:
            try:
                self.sock.sendall(data)
            except OSError as e:
                self.error = e
                raise
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
