"""Loopback TCP (with and without TCP_NODELAY) against a Unix domain socket, for our frames.

    .venv/bin/python bench/transport.py

Measures, between two processes: (1) the round trip of a small frame (what a
warm task pays per message: TASK, CLOSURE, LOG...), and (2) the throughput of a
1M-row x (2 long, 2 double, 1 string) Arrow IPC stream, written by pyarrow to
the socket and read back by pyarrow from a buffered reader, as the Worker does.
The Unix socket lives in a fresh 0700 directory.  Median of 5 runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time

import pyarrow as pa

ROUND_TRIPS = 2000


def table() -> pa.Table:
    n = 1_000_000
    return pa.table({"a": pa.array(range(n), pa.int64()), "b": pa.array(range(0, 7 * n, 7), pa.int64()),
                     "x": pa.array([i / 3 for i in range(n)]), "y": pa.array([0.5] * n),
                     "s": pa.array([f"s{i}" for i in range(n)])})


def peer(kind: str, address, nodelay: bool) -> None:
    """The other process: echo small frames, then send the Arrow stream."""
    fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.connect(address)
    if fam == socket.AF_INET and nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    for _ in range(ROUND_TRIPS):
        s.sendall(f.read(8) + b"x" * 56)        # header in, a 64-byte answer out
    data = table()
    for _ in range(5):
        f.read(1)
        sink = s.makefile("wb", buffering=1 << 20)
        with pa.ipc.new_stream(sink, data.schema) as w:
            for b in data.to_batches(max_chunksize=65536):
                w.write_batch(b)
        sink.flush()
    s.close()


def measure(kind: str, nodelay: bool) -> dict:
    tmp = None
    if kind == "unix":
        tmp = tempfile.mkdtemp(prefix="wb-uds-")         # 0700
        address = os.path.join(tmp, "backend.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(address)
    else:
        srv = socket.create_server(("127.0.0.1", 0))
        address = srv.getsockname()
    srv.listen(1)
    proc = mp.get_context("spawn").Process(target=peer, args=(kind, address, nodelay))
    proc.start()
    conn, _ = srv.accept()
    if kind == "tcp" and nodelay:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = conn.makefile("rb", buffering=1 << 20)
    t0 = time.perf_counter()
    for _ in range(ROUND_TRIPS):
        conn.sendall(b"\0" * 8)
        reader.read(64)
    rtt_us = (time.perf_counter() - t0) / ROUND_TRIPS * 1e6
    times = []
    nbytes = 0
    for _ in range(5):
        conn.sendall(b"g")
        t0 = time.perf_counter()
        got = pa.ipc.open_stream(reader).read_all()
        times.append(time.perf_counter() - t0)
        nbytes = got.nbytes
    proc.join()
    conn.close()
    srv.close()
    if tmp:
        os.unlink(address)
        os.rmdir(tmp)
    med = statistics.median(times)
    return {"round_trip_us": rtt_us, "stream_s": med, "gb_per_s": nbytes / med / 1e9}


def main() -> None:
    print(f"{'transport':24s} {'small-frame round trip':>24s} {'1M-row stream':>14s} {'GB/s':>6s}")
    for label, kind, nodelay in (("TCP loopback", "tcp", False), ("TCP loopback, NODELAY", "tcp", True),
                                 ("Unix socket (0700 dir)", "unix", False)):
        r = measure(kind, nodelay)
        print(f"{label:24s} {r['round_trip_us']:21.1f} us {r['stream_s']:12.3f} s {r['gb_per_s']:6.2f}")


if __name__ == "__main__":
    main()
