"""PyScript: the Python child that applies a closure to a partition.

Run as ``python -m workerbridge.child.python`` by a Worker, with the backend
port in the environment and the per-task secret as the first line of stdin.
Covers: connect, authenticate, load the closure (only after the secret checks
out), read the rows as an Arrow stream, call the closure, turn what it returns
into Arrow, write it back, report errors with the full traceback.

Imports only the standard library, the ``wire`` layer, pyarrow, pandas and
cloudpickle — never pyspark — so it runs in any interpreter that has those.
"""

from __future__ import annotations

import contextlib
import faulthandler
import inspect
import os
import socket
import sys
import threading
import traceback
from typing import Any, Optional

from workerbridge.child import userlog
from workerbridge.child.frames import ResultTypeError, to_pandas, to_table
from workerbridge.child.groups import group_frames, join_results, split_groups, with_keys
from workerbridge.wire import phases
from workerbridge.wire import protocol as P
from workerbridge.wire.lifecycle import language_of, line

ROLE = language_of("python").role
CLOSURE_ROLE = language_of("python").closure_role
MAX_BATCH_ROWS = 64 * 1024


def main() -> int:
    faulthandler.enable()               # a segfault leaves a stack in the stderr tail
    secret = sys.stdin.buffer.readline().strip()
    _watch_parent_stdin()
    host = os.environ.get(P.ENV_HOST, "127.0.0.1")
    port = int(os.environ[P.ENV_PORT])
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = sock.makefile("rb", buffering=1 << 20)
    P.send_frame(sock, P.AUTH, secret)
    P.send_json(sock, P.HELLO, {"pid": os.getpid(), "protocol": P.PROTOCOL_VERSION,
                                "language": "python", "runtime": sys.version.split()[0]})
    P.expect(stream, P.WELCOME, P.MAX_AUTH_BYTES)
    channel = Channel(sock)
    userlog.install(channel.closure_log)
    channel.log(line("connected"))
    closures: dict[str, Any] = {}
    baseline = Baseline()
    while True:
        try:
            msg_type, payload = P.recv_frame(stream)
        except P.PeerClosed:
            return 0
        if msg_type == P.BYE:
            return 0
        if msg_type != P.TASK:
            raise P.ProtocolError(f"expected TASK or BYE, got {P.MESSAGE_NAMES[msg_type]}")
        task = P.decode_json(payload)
        baseline.enter(task.get("job"), closures)
        try:
            run_task(task, stream, channel, closures)
        finally:
            Profile.stop()          # a task that failed midway leaves no profiler on


class Baseline:
    """What each new job finds in a warm child: the working directory, the
    environment and ``sys.path`` the child started with, and no closure of
    another job (with the closure go its globals).  Imported modules, and
    whatever state they hold, are kept: re-importing is what reuse saves."""

    def __init__(self):
        self.cwd, self.environ, self.path = os.getcwd(), dict(os.environ), list(sys.path)
        self.job: Optional[str] = None

    def enter(self, job: Optional[str], closures: dict) -> None:
        if job == self.job:
            return
        if self.job is not None:
            os.chdir(self.cwd)
            for name in set(os.environ) - set(self.environ):
                del os.environ[name]
            os.environ.update(self.environ)
            sys.path[:] = self.path
        closures.clear()
        self.job = job


class Channel:
    """The child's sending side: log lines, errors, results.

    While an Arrow stream is being written (batch mode, where the closure runs
    between batches) log lines wait in a queue and follow the stream.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.RLock()
        self.held: Optional[list] = None

    def log(self, message: str, level: str = "INFO", role: str = ROLE) -> None:
        record = {"level": level, "role": role, "message": message}
        with self.lock:
            if self.held is not None:
                self.held.append(record)
            else:
                P.send_json(self.sock, P.LOG, record)

    def closure_log(self, message: str, level: str = "INFO") -> None:
        self.log(message, level, CLOSURE_ROLE)

    def error(self, kind: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        with self.lock:
            P.send_json(self.sock, P.ERROR, {
                "kind": kind, "type": type(exc).__name__, "message": str(exc),
                "traceback": tb, "call": None})

    def hold(self) -> None:
        with self.lock:
            self.held = []

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held or [], None
            for record in held:
                P.send_json(self.sock, P.LOG, record)


class OutputStream:
    """The OUTPUT frame and its Arrow stream, begun only with the first batch,
    so an error before it can still travel as an ERROR frame."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.writer = None
        self.sink = None
        self.rows = 0

    def write(self, table) -> None:
        import pyarrow as pa
        if self.writer is None:
            self.schema = table.schema
            P.send_frame(self.channel.sock, P.OUTPUT)
            self.sink = self.channel.sock.makefile("wb", buffering=1 << 20)
            self.writer = pa.ipc.new_stream(self.sink, table.schema)
        elif not table.schema.equals(self.schema):
            table = _cast_like(table, self.schema)
        for batch in table.to_batches(max_chunksize=MAX_BATCH_ROWS):
            self.writer.write_batch(batch)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.flush()


def _cast_like(table, schema):
    if table.schema.names != schema.names:
        raise ResultTypeError(f"a batch's result has columns {table.schema.names}; the first "
                              f"batch's had {schema.names}")
    try:
        return table.cast(schema)
    except Exception as e:
        raise ResultTypeError(f"a batch's result types differ from the first batch's: {e}") \
            from None


def run_task(task: dict, stream, channel: Channel, closures: dict) -> None:
    import pyarrow as pa

    # The frames of a task always arrive in full (TASK, CLOSURE, INPUT+stream)
    # before we answer, even when an early step fails, so the next task starts
    # on a frame boundary.
    digest = task.get("closure_hash", "")
    payload = P.expect(stream, P.CLOSURE)
    P.expect(stream, P.INPUT)
    profile = Profile.start() if task.get("options", {}).get("profile") else None
    reader = pa.ipc.open_stream(stream)
    batch_mode = task.get("options", {}).get("batch_mode") == "batch"
    with timed(profile, "transfer"):
        table = None if batch_mode else reader.read_all()
    try:
        if digest not in closures:
            import cloudpickle
            closures.clear()
            closures[digest] = cloudpickle.loads(payload)
            channel.log(line("loaded", digest=digest[:12], size=len(payload)))
        packed = closures[digest]
    except BaseException as e:                    # noqa: BLE001 - reported, not swallowed
        _drain(reader)
        channel.error("unpickle", e)
        return
    if batch_mode:
        return run_batches(packed, reader, task, channel, profile)
    channel.log(line("retrieved", rows=table.num_rows))
    channel.log(line("columns", columns=table.num_columns))
    if task.get("options", {}).get("input") != "arrow":
        for name in nan_columns(table):
            channel.log(f"column '{name}': NaN becomes null on its way through pandas, which "
                        "has one missing value (input='arrow' keeps NaN)", "WARN")
    try:
        out, groups = apply(packed["func"], table, packed.get("context"), task, profile)
    except _Failed as failed:
        channel.error(failed.kind, failed.error)
        return
    channel.log(line("applied", rows=table.num_rows,
                     detail=f" in {groups} groups" if groups is not None else ""))
    channel.log(line("returned", rows=out.num_rows))
    with channel.lock, timed(profile, "send"):
        output = OutputStream(channel)
        output.write(out)
        output.close()
    if profile is not None:
        channel.log(profile.line())
    channel.log(line("finished"))
    P.send_json(channel.sock, P.DONE, {"rows_in": table.num_rows, "rows_out": out.num_rows})


def run_batches(packed, reader, task: dict, channel: Channel, profile=None) -> None:
    """Batch mode: the closure per Arrow batch, results streamed back while the
    input still arrives; memory bounded by a batch."""
    import pyarrow as pa
    rows_in = batches = 0
    failure = None
    output = OutputStream(channel)
    channel.hold()
    try:
        for batch in reader:
            rows_in += batch.num_rows
            batches += 1
            out, _ = apply(packed["func"], pa.Table.from_batches([batch]), packed.get("context"),
                           task, profile)
            if out.num_rows or output.writer is None:
                with timed(profile, "send"):
                    output.write(out)
    except _Failed as failed:
        failure = failed
    except ResultTypeError as e:
        failure = _Failed("result", e)
    finally:
        output.close()
        channel.release()
    if failure is not None:
        _drain(reader)
        channel.error(failure.kind, failure.error)
        return
    if output.writer is None:                      # no input batch at all
        output.write(pa.table({}))
        output.close()
    channel.log(line("retrieved", rows=rows_in))
    channel.log(line("columns", columns=len(reader.schema)))
    channel.log(line("applied", rows=rows_in, detail=f" in {batches} batches"))
    channel.log(line("returned", rows=output.rows))
    if profile is not None:
        channel.log(profile.line())
    channel.log(line("finished"))
    P.send_json(channel.sock, P.DONE, {"rows_in": rows_in, "rows_out": output.rows})


def nan_columns(table) -> list:
    """The floating-point columns that hold a NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc
    return [f.name for f, col in zip(table.schema, table.columns)
            if pa.types.is_floating(f.type) and pc.any(pc.is_nan(col)).as_py()]


def _drain(reader) -> None:
    """Read what is left of an input stream, so the next frame starts clean."""
    try:
        for _ in reader:
            pass
    except Exception:   # noqa: BLE001 - the Worker ends a child after an error anyway
        pass


class _Failed(Exception):
    def __init__(self, kind: str, error: BaseException):
        super().__init__(kind)
        self.kind, self.error = kind, error


class Profile:
    """``profile=True``: the task's phases and a cProfile of the whole task."""

    def __init__(self):
        import cProfile
        self.clock = phases.PhaseClock()
        self.profiler = cProfile.Profile()

    active: Optional["Profile"] = None

    @classmethod
    def start(cls) -> "Profile":
        prof = cls.active = cls()
        prof.profiler.enable()
        return prof

    @classmethod
    def stop(cls) -> None:
        if cls.active is not None:
            cls.active.profiler.disable()
            cls.active = None

    def line(self) -> str:
        self.profiler.disable()
        return phases.format_profile("cProfile", self.clock.seconds,
                                     phases.top_functions(self.profiler))


def timed(profile: Optional[Profile], name: str):
    """A phase of a profiled task (nothing when not profiling)."""
    return profile.clock.phase(name) if profile is not None else contextlib.nullcontext()


def apply(func, table, context, task: dict, profile: Optional[Profile] = None):
    """The closure over the partition, or over each whole group of it.

    Returns the result table and the number of groups (None without group_by).
    """
    options = task.get("options", {})
    as_arrow = options.get("input") == "arrow"
    keys = options.get("group_by") or []
    call = bind_closure(func, context, task)
    if keys:
        return _apply_groups(call, table, keys, as_arrow, task, profile)
    try:
        with timed(profile, "decode"):
            data = table if as_arrow else to_pandas(table)
        with timed(profile, "closure"):
            result = call(data)
    except BaseException as e:                    # noqa: BLE001
        raise _Failed("closure", e) from None
    return tag(_encode(result, table.schema, profile), task, 0), None


def _encode(result, like, profile: Optional[Profile]):
    try:
        with timed(profile, "encode"):
            return to_table(result, like=like)
    except BaseException as e:                    # noqa: BLE001
        raise _Failed("result", e) from None


JOIN_ROWS = 64 * 1024     # groups' DataFrame results converted together, about this many rows


def _result_rows(result) -> int:
    """About how many rows a group's result holds, for ``JOIN_ROWS``: a dict
    of scalars one, a kind the bulk path does not take ``JOIN_ROWS`` (so it
    is converted at once)."""
    import pandas as pd
    if isinstance(result, pd.DataFrame):
        return len(result)
    if isinstance(result, dict):
        return 1 if all(pd.api.types.is_scalar(v) for v in result.values()) else JOIN_ROWS
    return JOIN_ROWS


def _apply_groups(call, table, keys: list, as_arrow: bool, task: dict,
                  profile: Optional[Profile]):
    """The closure over each whole group.  The group columns are put in front
    of a result that dropped them, and empty group results are dropped.
    Results are converted to Arrow a run of groups at a time (``JOIN_ROWS``),
    so that pandas holds at most that many result rows."""
    import pyarrow as pa
    groups = split_groups(table, keys)
    like = table.schema
    bulk = not task.get("options", {}).get("tag_units")
    parts: list = []
    pending: list = []                    # (group index, result) not yet converted

    def convert() -> None:
        joined = None
        if bulk:
            with timed(profile, "encode"):
                joined = join_results([r for _, r in pending],
                                      [groups.starts[i] for i, _ in pending],
                                      groups.ordered, keys, like)
        if joined is not None:
            parts.append(joined)
        for i, result in ([] if joined is not None else pending):
            out = _encode(result, like, profile)
            if out.num_rows:
                part = groups.ordered.slice(groups.starts[i], groups.counts[i])
                parts.append(tag(with_keys(out, part, keys), task, len(parts)))
        pending.clear()

    inputs = iter(groups.parts() if as_arrow else group_frames(groups))
    rows = 0
    for i in range(len(groups)):
        try:
            with timed(profile, "decode"):
                data = next(inputs)
            with timed(profile, "closure"):
                result = call(data)
        except BaseException as e:                # noqa: BLE001
            raise _Failed("closure", e) from None
        pending.append((i, result))
        rows += _result_rows(result)
        if rows >= JOIN_ROWS or i == len(groups) - 1:
            convert()
            rows = 0
    if not parts:
        return pa.table({}), len(groups)
    try:
        return pa.concat_tables(parts, promote_options="permissive"), len(groups)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _Failed("result", TypeError(f"the groups' results do not share one schema: {e}")) \
            from None


def tag(out, task: dict, unit: int):
    """For ``fetch_result_as_sdf=False``: which partition and which group each row came from."""
    import pyarrow as pa
    if not task.get("options", {}).get("tag_units") or out.num_columns == 0:
        return out
    n = out.num_rows
    out = out.append_column("__wb_partition", pa.array([int(task.get("partition") or 0)] * n, pa.int64()))
    return out.append_column("__wb_unit", pa.array([unit] * n, pa.int64()))


def bind_closure(func, context, task: dict):
    """``data -> result``: ``func(data)``, or ``func(data, context)`` when it
    takes two positional parameters; the partition index under
    ``partition_index_param`` and the barrier task infos as ``barrier=`` when
    it has such parameters.  The signature is read once, not per group."""
    kwargs = {}
    param = task.get("options", {}).get("partition_index_param")
    if param:
        kwargs[param] = task.get("partition")
    if task.get("barrier") is not None and _has_param(func, "barrier"):
        kwargs["barrier"] = task["barrier"]
    if _takes_two(func, exclude=set(kwargs)):
        return lambda data: func(data, context, **kwargs)
    return lambda data: func(data, **kwargs)


def _has_param(func, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _takes_two(func, exclude=frozenset()) -> bool:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in exclude]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())


def _watch_parent_stdin() -> None:
    """Exit at once when stdin reaches EOF: the Worker that started us is gone."""

    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os._exit(70)

    threading.Thread(target=watch, name="workerbridge-parent-watch", daemon=True).start()


def _exit(code: int) -> None:
    # os._exit: a daemon thread blocked on stdin must not hold up interpreter
    # teardown, and the Worker is waiting for us to be gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        _exit(main())
    except P.ProtocolError as e:
        sys.stderr.write(f"PyScript: protocol error: {e}\n")
        _exit(2)
    except OSError as e:
        sys.stderr.write(f"PyScript: connection to the Worker failed: {e}\n")
        _exit(3)
    except BaseException:               # a fault of PyScript's own: its traceback, an exit code
        sys.stderr.write("PyScript: internal error\n")   # (not SIGABRT at teardown)
        traceback.print_exc()
        _exit(4)
