"""Where the Python side's time goes, from a py-spy raw profile of a bench run.

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record --subprocesses -r 250 -f raw -o /tmp/py.raw -- \\
        .venv/bin/python bench/run.py --rows 1000000 --partitions 2 --repeat 5 \\
        --no-transform --only "spark_apply Python warm"
    .venv/bin/python bench/pyspy_summary.py /tmp/py.raw

Splits the samples (CPU only: py-spy leaves idle threads out unless --idle)
by process: Spark's Python workers, the PyScript children, the driver; and
lists, per process kind, the functions holding at least --min percent of its
samples (inclusive: a function counts with everything it calls).
"""

from __future__ import annotations

import argparse
import collections
import re


def kind_of(stack: str) -> str:
    if "workerbridge.child.python" in stack:
        return "PyScript child"
    if "pyspark.daemon" in stack:
        return "Spark Python worker"
    return "driver and other"


def frame_name(frame: str) -> str:
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('/', 1)[-1]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="py-spy record -f raw output")
    ap.add_argument("--min", type=float, default=4.0, help="percent of a kind's samples")
    args = ap.parse_args()
    per_kind = collections.Counter()
    inclusive = collections.Counter()
    with open(args.raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():          # a process line of a header, not a stack
                continue
            n = int(count)
            kind = kind_of(stack)
            per_kind[kind] += n
            frames = [frame_name(fr) for fr in stack.split(";")
                      if not fr.startswith("process ")]
            for name in set(frames):
                inclusive[(kind, name)] += n
    total = sum(per_kind.values())
    for kind, n in per_kind.most_common():
        print(f"{kind}: {n} samples ({n / total * 100:.1f}%)")
        for (k, name), m in inclusive.most_common():
            if k == kind and m >= n * args.min / 100:
                print(f"  {m / n * 100:5.1f}%  {name}")


if __name__ == "__main__":
    main()
