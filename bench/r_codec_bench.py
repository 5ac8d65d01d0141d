"""Benchmark of the base-R Arrow IPC codec (rscripts/arrow_ipc.R).

Writes a 1M-row table (2 int64, 2 float64, 1 string column) with pyarrow, then
runs bench/r_codec_bench.R on it, which times decoding and encoding separately.

    .venv/bin/python bench/r_codec_bench.py [rows]
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rng = np.random.default_rng(1)
    strings = np.array([f"row-{i}-{'é' if i % 7 == 0 else 'x'}" for i in range(rows)], dtype=object)
    table = pa.table({
        "i1": pa.array(rng.integers(-2**40, 2**40, rows), pa.int64()),
        "i2": pa.array(rng.integers(0, 1000, rows), pa.int64(), mask=rng.random(rows) < 0.1),
        "d1": pa.array(rng.standard_normal(rows)),
        "d2": pa.array(rng.random(rows), mask=rng.random(rows) < 0.1),
        "s": pa.array(strings, pa.string()),
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.arrow")
        with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        subprocess.run(["Rscript", "--vanilla", os.path.join(HERE, "r_codec_bench.R"), path],
                       check=True)


if __name__ == "__main__":
    main()
