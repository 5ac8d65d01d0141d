"""Wire protocol between a Worker and its child (PyScript or RScript).

Covers: the frame format, the named message types, the handshake order and the
size bounds.  Does not cover: what a child does with a message (``child.python``
and ``rscripts/child.R``) or process supervision (``supervise``).

This module imports only the standard library, so the Python child can use it
in any interpreter.  ``rscripts/protocol.R`` holds the same constant table; a
test keeps the two equal.

Frames
------
Every frame is an 8-byte header, then the payload::

    int32  message type   (big-endian)
    uint32 payload length (big-endian, at most MAX_FRAME_BYTES;
                           at most MAX_AUTH_BYTES before the secret checks out)

Two frames, ``INPUT`` and ``OUTPUT``, announce that a raw Arrow IPC *stream*
follows on the socket, ending with its own end-of-stream marker.  ``INPUT``'s
payload is empty; ``OUTPUT``'s is empty or, from RScript in partition mode,
``{"input_columns": {"<output position>": <input position>}}``: those output
columns are of type Null and hold nothing, and the Worker puts back the input
columns it sent (``task.passthrough``).  JSON payloads are UTF-8.

Frames are written with ``socket.sendall`` and read from a buffered file-like
object over the socket (``read(n)`` semantics), so that an Arrow stream reader
and the frame reader share one buffer.

Order of one task::

    child  -> AUTH     the per-task secret (ASCII hex); compared in constant time
    child  -> HELLO    {"pid", "protocol", "language", "runtime"}
    worker -> WELCOME  {"protocol"}            (or the worker closes the socket)
    worker -> TASK     {"partition", "task_id", "job", "options", "context" (R)...}
                       (a new "job" first resets what the last job's closure left)
    worker -> CLOSURE  cloudpickle bytes (Python) or R source (UTF-8), or R's
                       serialize() (options "closure_format": "serialized")
    worker -> INPUT    + Arrow IPC stream of the partition's rows
    child  -> LOG*     {"level", "role", "message"}   (any time after WELCOME)
    child  -> OUTPUT   + Arrow IPC stream of the result  (then DONE); payload
                       empty or {"input_columns"} (RScript, partition mode)
           or ERROR    {"kind", "type", "message", "traceback", "call"}
    child  -> DONE     {"rows_in", "rows_out"}
    worker -> BYE      the child exits (EOF on the socket means the same)
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, BinaryIO

PROTOCOL_VERSION = 1

# The custom metadata key of an INPUT record batch that lists (comma-separated,
# 0-based) its plain string columns whose bytes are all ASCII; the R reader
# (rscripts/arrow_ipc.R, .ai_ascii_key) then skips its UTF-8 check of them.
ASCII_COLUMNS_KEY = "workerbridge.ascii"

# The constant table.  rscripts/protocol.R must hold the same names and values.
MESSAGE_TYPES: dict[str, int] = {
    "AUTH": 1,
    "HELLO": 2,
    "WELCOME": 3,
    "TASK": 4,
    "CLOSURE": 5,
    "INPUT": 6,
    "LOG": 7,
    "ERROR": 8,
    "OUTPUT": 9,
    "DONE": 10,
    "BYE": 11,
}
AUTH = MESSAGE_TYPES["AUTH"]
HELLO = MESSAGE_TYPES["HELLO"]
WELCOME = MESSAGE_TYPES["WELCOME"]
TASK = MESSAGE_TYPES["TASK"]
CLOSURE = MESSAGE_TYPES["CLOSURE"]
INPUT = MESSAGE_TYPES["INPUT"]
LOG = MESSAGE_TYPES["LOG"]
ERROR = MESSAGE_TYPES["ERROR"]
OUTPUT = MESSAGE_TYPES["OUTPUT"]
DONE = MESSAGE_TYPES["DONE"]
BYE = MESSAGE_TYPES["BYE"]
MESSAGE_NAMES: dict[int, str] = {v: k for k, v in MESSAGE_TYPES.items()}

HEADER_BYTES = 8
MAX_AUTH_BYTES = 1024            # bound on any frame before the secret checks out
MAX_FRAME_BYTES = 1 << 30        # bound on any frame after (1 GiB)
SECRET_BYTES = 32                # random bytes; sent as 64 hex characters
# a log line's message is cut here (UTF-8 bytes): below the whole line's cap
# (wire/logline.LINE_CAP_BYTES, 64 KiB) by room for the line's prefix and the marker
LOG_LINE_MAX_BYTES = 64 * 1024 - 512

# Environment variables a Worker sets for its child.  The secret is never among
# them: it travels on the child's stdin, the first line.
ENV_PORT = "WORKERBRIDGE_PORT"
ENV_HOST = "WORKERBRIDGE_HOST"

_HEADER = struct.Struct(">iI")


class ProtocolError(Exception):
    """The peer broke the protocol: a short read, an unknown type, an oversized frame."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (EOF) where a frame was expected."""


def pack_header(msg_type: int, length: int) -> bytes:
    return _HEADER.pack(msg_type, length)


def unpack_header(header: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[int, int]:
    """(message type, payload length) of an 8-byte header; refuse unknown types and
    lengths above ``max_bytes``."""
    msg_type, length = _HEADER.unpack(header)
    if msg_type not in MESSAGE_NAMES:
        raise ProtocolError(f"unknown message type {msg_type} (header {header.hex()})")
    if length > max_bytes:
        raise ProtocolError(
            f"{MESSAGE_NAMES[msg_type]} frame announces {length} bytes; "
            f"the bound here is {max_bytes}")
    return msg_type, length


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes from a file-like ``stream``; :class:`PeerClosed` on EOF."""
    data = stream.read(n)
    if data is None or len(data) < n:
        got = 0 if data is None else len(data)
        raise PeerClosed(f"connection closed after {got} of {n} bytes")
    return data


def send_frame(sock: socket.socket, msg_type: int, payload: bytes = b"") -> None:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"{MESSAGE_NAMES.get(msg_type, msg_type)} frame of {len(payload)} bytes "
            f"exceeds the {MAX_FRAME_BYTES}-byte bound")
    header = _HEADER.pack(msg_type, len(payload))
    if len(payload) < 65536:          # one syscall for the small frames
        sock.sendall(header + payload)
    else:                             # no copy of a large payload
        sock.sendall(header)
        sock.sendall(payload)


def send_json(sock: socket.socket, msg_type: int, obj: Any) -> None:
    send_frame(sock, msg_type, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def recv_frame(stream: BinaryIO, max_bytes: int = MAX_FRAME_BYTES) -> tuple[int, bytes]:
    """Read one frame; refuse unknown types and lengths above ``max_bytes``."""
    msg_type, length = recv_header(stream, max_bytes)
    return msg_type, read_exact(stream, length) if length else b""


def recv_header(stream: BinaryIO, max_bytes: int = MAX_FRAME_BYTES) -> tuple[int, int]:
    """Read one frame's header: (type, payload length), both checked; the
    payload is left to the caller (:func:`read_exact`, or :func:`skip`)."""
    return unpack_header(read_exact(stream, HEADER_BYTES), max_bytes)


def skip(stream: BinaryIO, n: int, chunk: int = 1 << 20) -> None:
    """Read and drop ``n`` bytes, a chunk at a time; :class:`PeerClosed` on EOF."""
    while n > 0:
        n -= len(read_exact(stream, min(n, chunk)))


def expect(stream: BinaryIO, want: int, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Read one frame that must be of type ``want``; return its payload."""
    msg_type, payload = recv_frame(stream, max_bytes)
    if msg_type != want:
        raise ProtocolError(
            f"expected {MESSAGE_NAMES[want]}, got {MESSAGE_NAMES[msg_type]}")
    return payload


def close_quietly(*ends) -> None:
    """Close a connection's stream and socket; one already broken is closed enough."""
    for f in ends:
        try:
            f.close()
        except OSError:
            pass


def cap_line(message: str, total: int | None = None) -> str:
    """``message`` cut to ``LOG_LINE_MAX_BYTES`` of UTF-8 with a marker saying
    how long it was (``total`` bytes when the caller saw more than it kept).

    >>> cap_line("x" * 70000).endswith("… [log line truncated: 70000 bytes in all]")
    True
    """
    data = message.encode("utf-8", "replace")
    size = max(total or 0, len(data))
    if size <= LOG_LINE_MAX_BYTES:
        return message
    kept = data[:LOG_LINE_MAX_BYTES].decode("utf-8", "ignore")
    return f"{kept}… [log line truncated: {size} bytes in all]"


def decode_json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"malformed JSON payload: {e}") from None
