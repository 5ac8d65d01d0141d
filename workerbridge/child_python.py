"""PyScript: the Python child that applies a closure to a partition.

Run as ``python -m workerbridge.child_python`` by a Worker, with the backend
port in the environment and the per-task secret as the first line of stdin.
Covers: connect, authenticate, load the closure (only after the secret checks
out), read the rows as an Arrow stream, call the closure, turn what it returns
into Arrow, write it back, report errors with the full traceback.

Imports only the standard library, the protocol module, pyarrow, pandas and
cloudpickle — never pyspark — so it runs in any interpreter that has those.
"""

from __future__ import annotations

import faulthandler
import inspect
import os
import socket
import sys
import threading
import traceback
from typing import Any

from workerbridge import protocol as P
from workerbridge import userlog

ROLE = "PyScript"
CLOSURE_ROLE = "PyClosure"
MAX_BATCH_ROWS = 64 * 1024


class ResultTypeError(TypeError):
    """The closure returned something that cannot become a table."""


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
    channel.log("is connected to backend")
    closures: dict[str, Any] = {}
    while True:
        try:
            msg_type, payload = P.recv_frame(stream)
        except P.PeerClosed:
            return 0
        if msg_type == P.BYE:
            return 0
        if msg_type != P.TASK:
            raise P.ProtocolError(f"expected TASK or BYE, got {P.MESSAGE_NAMES[msg_type]}")
        run_task(P.decode_json(payload), stream, channel, closures)


class Channel:
    """The child's sending side: log lines, errors, results."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()

    def log(self, message: str, level: str = "INFO", role: str = ROLE) -> None:
        with self.lock:
            P.send_json(self.sock, P.LOG, {"level": level, "role": role, "message": message})

    def closure_log(self, message: str, level: str = "INFO") -> None:
        self.log(message, level, CLOSURE_ROLE)

    def error(self, kind: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        with self.lock:
            P.send_json(self.sock, P.ERROR, {
                "kind": kind, "type": type(exc).__name__, "message": str(exc),
                "traceback": tb, "call": None})


def run_task(task: dict, stream, channel: Channel, closures: dict) -> None:
    import pyarrow as pa

    # The frames of a task always arrive in full (TASK, CLOSURE, INPUT+stream)
    # before we answer, even when an early step fails, so the next task starts
    # on a frame boundary.
    digest = task.get("closure_hash", "")
    payload = P.expect(stream, P.CLOSURE)
    P.expect(stream, P.INPUT)
    table = pa.ipc.open_stream(stream).read_all()
    channel.log(f"retrieved {table.num_rows} rows")
    channel.log(f"retrieved {table.num_columns} column names")
    try:
        if digest not in closures:
            import cloudpickle
            closures.clear()
            closures[digest] = cloudpickle.loads(payload)
        packed = closures[digest]
    except BaseException as e:                    # noqa: BLE001 - reported, not swallowed
        channel.error("unpickle", e)
        return
    options = task.get("options", {})
    try:
        data = table if options.get("input") == "arrow" else to_pandas(table)
        result = call_closure(packed["func"], data, packed.get("context"), task)
    except BaseException as e:                    # noqa: BLE001
        channel.error("closure", e)
        return
    channel.log(f"applied closure to {table.num_rows} rows")
    try:
        out = to_table(result)
    except BaseException as e:                    # noqa: BLE001
        channel.error("result", e)
        return
    channel.log(f"returned {out.num_rows} rows")
    with channel.lock:
        P.send_frame(channel.sock, P.OUTPUT)
        sink = channel.sock.makefile("wb", buffering=1 << 20)
        with pa.ipc.new_stream(sink, out.schema) as writer:
            for batch in out.to_batches(max_chunksize=MAX_BATCH_ROWS):
                writer.write_batch(batch)
        sink.flush()
    channel.log("finished")
    P.send_json(channel.sock, P.DONE, {"rows_in": table.num_rows, "rows_out": out.num_rows})


def to_pandas(table):
    """The table as pandas, losing nothing: integer and bool columns with nulls
    become pandas' nullable dtypes (``Int64``, ``boolean``), not float or object,
    so a 64-bit integer keeps every digit."""
    import pandas as pd
    import pyarrow as pa
    nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
                pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
                pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(),
                pa.bool_(): pd.BooleanDtype()}
    frame = table.to_pandas()
    for i, col in enumerate(table.columns):
        if col.null_count and col.type in nullable:
            frame.isetitem(i, col.to_pandas(types_mapper=nullable.get))
    return frame


def call_closure(func, data, context, task: dict):
    """``func(data)``, or ``func(data, context)`` when it takes two positional args;
    the partition index by keyword when ``partition_index_param`` is set."""
    kwargs = {}
    param = task.get("options", {}).get("partition_index_param")
    if param:
        kwargs[param] = task.get("partition")
    if _takes_two(func, exclude=param):
        return func(data, context, **kwargs)
    return func(data, **kwargs)


def _takes_two(func, exclude=None) -> bool:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != exclude]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())


def to_table(result):
    """What a closure may return, as one ``pyarrow.Table``.

    A DataFrame, Table, RecordBatch or dict of columns is a table; a list,
    tuple or generator of those is concatenated; a Series, array, list or
    scalar becomes one column named ``result``; ``None`` is no rows.
    """
    import pandas as pd
    import pyarrow as pa

    if result is None:
        return pa.table({})
    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    if isinstance(result, pd.DataFrame):
        _check_columns(list(result.columns))
        return pa.Table.from_pandas(result, preserve_index=False)
    if isinstance(result, dict):
        scalars = all(pd.api.types.is_scalar(v) for v in result.values())
        return to_table(pd.DataFrame([result]) if scalars and result else pd.DataFrame(result))
    if isinstance(result, pd.Series):
        return pa.Table.from_pandas(pd.DataFrame({"result": result}), preserve_index=False)
    if isinstance(result, (list, tuple)) or inspect.isgenerator(result):
        parts = list(result)
        if parts and all(isinstance(p, (pd.DataFrame, pa.Table, pa.RecordBatch, dict)) for p in parts):
            tables = [to_table(p) for p in parts]
            return pa.concat_tables(tables, promote_options="default")
        return pa.table({"result": pa.array(parts)})
    if hasattr(result, "__array__") and getattr(result, "ndim", 1) >= 1:
        return pa.table({"result": pa.array(pd.Series(list(result) if getattr(result, "ndim", 1) > 1
                                                       else result))})
    if isinstance(result, (str, bytes, int, float, bool)) or hasattr(result, "dtype") \
            or result.__class__.__module__ in ("datetime", "decimal"):
        return pa.table({"result": pa.array([result])})
    raise ResultTypeError(
        f"the closure returned a {type(result).__module__}.{type(result).__qualname__}; "
        "return a pandas DataFrame, a pyarrow Table or RecordBatch, a dict of columns, "
        "a list of those, or a Series/array/list/scalar (one column named 'result')")


def _check_columns(names: list) -> None:
    seen = set()
    for name in names:
        if not isinstance(name, str):
            raise ResultTypeError(f"result column name {name!r} is not a string; "
                                  "name the columns of the returned DataFrame")
        if name in seen:
            raise ResultTypeError(f"result has the column name {name!r} twice")
        seen.add(name)


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
