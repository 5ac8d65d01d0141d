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

import hmac
import io
import itertools
import json
import os
import secrets
import select
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
from .conform import conform
from .logsink import LogSink
from .pool import POOL, Warm
from .spec import R_LANG, TaskSpec
from .supervise import Child, exit_name, format_bytes, tree_rss

POLL_S = 0.2
CHILD_MODULE = "workerbridge.child.python"   # run with -m; tests match it in a cmdline
COALESCE_ROWS = 100_000        # input rows joined into one batch for the child
COALESCE_BYTES = 16 * 2**20    # ... or bytes, whichever comes first


R_MIN_VSIZE = 256 * 2**20       # R's vector heap before its first collection


def r_heap_args(memory_limit: Optional[int]) -> list:
    """Rscript flags that size R's vector heap, the allocations after which R
    collects garbage (R's own default: 64 MB).  With that default a 500k-row
    partition spent ~40% of its codec time in collections (bench/worker_loop.py:
    warm R task, 500k rows, 0.39 s -> 0.24-0.26 s with 256 MB; a larger
    cons-cell heap, --min-nsize, measured slower).  Batch mode keeps R's
    default: its point is a small footprint (8 MB measured a higher idle and
    peak RSS than the default).  A memory_limit caps the heap at a quarter of it."""
    vsize = R_MIN_VSIZE if memory_limit is None else \
        max(16 * 2**20, min(R_MIN_VSIZE, memory_limit // 4))
    return [f"--min-vsize={vsize // 2**20}M"]


class _Gone(Exception):
    """Raised inside a read: the child exited."""


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

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            ready, _, _ = select.select([self.sock], [], [], POLL_S)
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
                 extra: Optional[dict] = None, *, root: str):
        self.spec = spec
        self.root = Path(root)           # the shipped runtime, laid out by the caller
        self.extra = dict(extra or {})
        self.closure = spec.closure
        self.partition = partition
        self.task_id = task_id
        self.role = spec.closure.role
        self.language = spec.closure.language_name
        self.log = LogSink(task_id, spec.gateway)
        self.child: Optional[Child] = None
        self.stats: dict = {}
        self._writer_error: Optional[BaseException] = None

    # ---- the task -----------------------------------------------------------------
    def run(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        try:
            it = iter(batches)
            first = next((b for b in it if b.num_rows > 0), None)
            if first is None:
                self.log.write("Worker", line("empty", partition=self.partition))
                return
            label = f" for {self.spec.name!r}" if self.spec.name else ""
            self.log.write("Worker", line("start", partition=self.partition, label=label))
            yield from self._run(first, it)
        except TaskError as e:
            self.log.write("Worker", line("failed", partition=self.partition, what=e.what), "ERROR")
            e.attach_log(self.log.kept())
            raise
        finally:
            self.log.flush()

    def _run(self, first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        opts = self.spec.options
        self._started = time.monotonic()
        self._deadline = self._started + opts.timeout if opts.timeout else None
        argv, env = self._command()
        key = (tuple(argv), tuple(sorted(opts.env.items())), self.spec.runtime_digest)
        warm: Optional[Warm] = None
        writer: Optional[threading.Thread] = None
        kept = False
        try:
            warm = POOL.take(key) if opts.reuse else None
            if warm is not None:
                self.child = warm.child
                self.log.write("Worker", line("reused", role=self.role, pid=warm.child.pid,
                                                tasks=warm.tasks))
            else:
                warm = self._start(argv, env)
            warm.reader.watch = lambda data_ready: self._watch(self._deadline, "timeout", data_ready)
            P.send_json(warm.conn, P.TASK, self._task_json())
            # A warm child that has this closure already gets an empty CLOSURE frame.
            P.send_frame(warm.conn, P.CLOSURE,
                         b"" if warm.digest == self.closure.digest else self.closure.code)
            P.send_frame(warm.conn, P.INPUT)
            writer = threading.Thread(target=self._write_input, args=(warm.conn, first, rest),
                                      name="workerbridge-input", daemon=True)
            writer.start()
            yield from self._read_result(warm.stream)
            if opts.memory_limit:                 # one last sample: short tasks never wait
                self.stats["peak_rss"] = max(self.stats.get("peak_rss", 0), tree_rss(self.child.pid))
            writer.join(5.0)
            warm.digest, warm.tasks = self.closure.digest, warm.tasks + 1
            self.log.write("Worker", line("completed", language=self.language))
            if "peak_rss" in self.stats:
                self.log.write("Worker", f"peak RSS of the {self.role} process tree "
                                         f"{format_bytes(self.stats['peak_rss'])}")
            if opts.reuse and not writer.is_alive():
                POOL.give(key, warm, opts.idle_timeout)
                kept = True
                self.log.write("Worker", line("kept", role=self.role, pid=warm.child.pid))
            else:
                P.send_frame(warm.conn, P.BYE)
                self.child.close_stdin()
                self.child.wait(1.0)
        except TaskError:
            raise
        except GeneratorExit:
            raise
        except _Breach as e:
            raise self._limit_error(e) from None
        except BaseException as e:                    # classify what broke
            raise self._classify(e) from e
        finally:
            if not kept:
                # Never reused after an error, a breach or an early stop.
                if warm is not None:
                    P.close_quietly(warm.stream, warm.conn)
                if self.child is not None:
                    left = self.child.end()
                    if left:
                        self.log.write("Worker", f"could not end processes {left}", "ERROR")
                    self.child.release()
            if writer is not None:
                writer.join(5.0)

    # ---- steps ------------------------------------------------------------------------
    def _start(self, argv: list, env: dict) -> Warm:
        """A new child, connected and authenticated."""
        listener = socket.create_server(("127.0.0.1", 0), backlog=4)
        try:
            secret = secrets.token_hex(P.SECRET_BYTES)
            port = listener.getsockname()[1]
            env = dict(env, **{P.ENV_PORT: str(port), P.ENV_HOST: "127.0.0.1"})
            self.child = Child(argv, env, secret)
            self.log.write("Worker", line("started", role=self.role, pid=self.child.pid))
            self.log.write("Worker", line("waiting", role=self.role, port=port))
            conn, stream = self._accept(listener, secret,
                                        self._started + self.spec.options.connect_timeout)
            return Warm(self.child, conn, stream, stream.raw)
        finally:
            listener.close()                      # a second connection is refused

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
                or "R_VSIZE" in env else r_heap_args(opts.memory_limit)
            return [exe, "--vanilla", *heap, str(root / "rscripts" / "child.R")], env
        exe = opts.python or sys.executable
        if shutil.which(exe) is None:
            raise ChildDiedError(
                f"Python interpreter not found: {exe!r}", exit_code=None, stderr_tail="",
                partition=self.partition, language=self.language, role=self.role,
                hint="pass python= an interpreter that exists on every node and has "
                     "pyarrow, pandas and cloudpickle")
        env["PYTHONPATH"] = str(root)
        env.pop("PYTHONSTARTUP", None)
        return [exe, "-m", CHILD_MODULE], env

    def _accept(self, listener: socket.socket, secret: str, deadline: float):
        """The first connection that proves the secret; strangers are refused."""
        want = secret.encode("ascii")
        while True:
            ready, _, _ = select.select([listener], [], [], POLL_S)
            if not ready:
                if self.child.poll() is not None:
                    raise self._died(f"the {self.role} child exited before connecting")
                if time.monotonic() > deadline:
                    raise LimitError(
                        f"{self.role} did not connect within {self.spec.options.connect_timeout:g} s",
                        exit_code=self.child.poll(), stderr_tail=self.child.stderr_tail(),
                        partition=self.partition, language=self.language, role=self.role,
                        hint="the child may be stuck starting up; see its stderr above")
                continue
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            auth_deadline = min(deadline, time.monotonic() + self.spec.options.auth_timeout)
            reader = _ChildReader(conn, lambda data_ready: self._watch(auth_deadline, "auth",
                                                                       data_ready))
            stream = io.BufferedReader(reader, buffer_size=1 << 20)
            try:
                got = P.expect(stream, P.AUTH, P.MAX_AUTH_BYTES)
                ok = hmac.compare_digest(got, want)
            except (_Breach, P.ProtocolError, OSError):
                ok = False
            except _Gone:
                conn.close()
                raise self._died(f"the {self.role} child exited before authenticating") from None
            if not ok:
                self.log.write("Worker", "refused a backend connection without the task's secret",
                               "WARN")
                conn.close()
                continue
            hello = P.decode_json(P.expect(stream, P.HELLO, P.MAX_AUTH_BYTES))
            if hello.get("protocol") != P.PROTOCOL_VERSION:
                conn.close()
                raise TransportError(
                    f"{self.role} speaks protocol {hello.get('protocol')}, this Worker "
                    f"{P.PROTOCOL_VERSION}", partition=self.partition, language=self.language,
                    role=self.role, hint="driver and executors run different workerbridge versions")
            P.send_json(conn, P.WELCOME, {"protocol": P.PROTOCOL_VERSION})
            self.stats["child_pid"] = hello.get("pid")
            return conn, stream             # the task's watch replaces the auth one in _run

    def _task_json(self) -> dict:
        msg = {"partition": self.partition, "task_id": str(self.task_id),
               "closure_hash": self.closure.digest, "options": self.closure.options}
        if self.closure.context_json is not None:
            msg["context"] = json.loads(self.closure.context_json)
        msg.update(self.extra)
        return msg

    def _write_input(self, conn: socket.socket, first: pa.RecordBatch,
                     rest: Iterator[pa.RecordBatch]) -> None:
        """Writer thread: the partition's rows as one Arrow stream.  Never raises."""
        rows = 0
        try:
            sink = _SocketSink(conn)
            with pa.ipc.new_stream(sink, first.schema) as w:
                for batch in self._input_batches(first, rest):
                    w.write_batch(batch)
                    rows += batch.num_rows
            self.stats["rows_sent"] = rows
        except BaseException as e:                  # noqa: BLE001 - stored, re-raised by the reader
            self._writer_error = e

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
                yield _joined(pending)
                pending, rows, size = [], 0, 0
        if pending:
            yield _joined(pending)

    def _read_result(self, stream: io.BufferedReader) -> Iterator[pa.RecordBatch]:
        lang = language_of(self.closure.language)
        allowed = {lang.role, lang.closure_role}
        while True:
            msg_type, payload = P.recv_frame(stream)
            if msg_type == P.LOG:
                rec = P.decode_json(payload)
                role = rec.get("role") if rec.get("role") in allowed else self.role
                self.log.write(role, str(rec.get("message", "")), level_of(rec.get("level")))
            elif msg_type == P.ERROR:
                raise self._closure_error(P.decode_json(payload))
            elif msg_type == P.OUTPUT:
                rows = 0
                reader = pa.ipc.open_stream(stream)
                for batch in reader:
                    rows += batch.num_rows
                    yield self._conform(batch)
                self.stats["rows_out"] = rows
            elif msg_type == P.DONE:
                self.stats.update(P.decode_json(payload))
                if self._writer_error is not None:
                    raise self._writer_error
                return
            else:
                raise P.ProtocolError(f"unexpected {P.MESSAGE_NAMES[msg_type]} from {self.role}")

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
        """Called while a read waits: raise if the child died or a limit is breached."""
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


def _joined(batches: list) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


class _SocketSink:
    """A write-only file for pyarrow's stream writer: straight to the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False

    def write(self, data) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
