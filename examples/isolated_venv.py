"""A Python closure run by another interpreter: a separate venv, given as `python=`.

The example creates a venv that sees this interpreter's packages
(`--system-site-packages`; a real one would `pip install` its own pyarrow, pandas,
cloudpickle and whatever the closure needs), and runs the closure with it.
If no venv can be created here, it says so and stops.

Run with `.venv/bin/python examples/isolated_venv.py`.
"""

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from local_spark import local_spark  # noqa: E402

from workerbridge import spark_apply  # noqa: E402


def make_venv(where: str) -> str | None:
    """A venv at ``where`` whose python can import pyarrow, pandas and cloudpickle."""
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", "--system-site-packages", "--without-pip", where],
                       check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"cannot create a venv here ({e}); skipping this example")
        return None
    python = os.path.join(where, "bin", "python")
    # A venv built on the base interpreter does not see *this* venv's site-packages:
    # point it there with a .pth file (a real setup would pip install into it).
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "workerbridge-example.pth"), "w") as f:
        f.write(ours + "\n")
    probe = subprocess.run([python, "-c", "import pyarrow, pandas, cloudpickle"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"the new venv cannot import pyarrow, pandas and cloudpickle; skipping "
              f"({probe.stderr.strip().splitlines()[-1]})")
        return None
    return python


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="workerbridge-venv-") as tmp:
        python = make_venv(os.path.join(tmp, "venv"))
        if python is None:
            return
        spark = local_spark("workerbridge-isolated-venv")
        df = spark.range(0, 6, numPartitions=2)

        def where_am_i(d):
            import sys
            return d.assign(python=sys.prefix)

        out = spark_apply(df, where_am_i, schema="id long, python string", python=python)
        for row in out.orderBy("id").collect():
            print(row.id, row.python)
        assert {r.python for r in out.collect()} == {os.path.dirname(os.path.dirname(python))}
        print(f"every partition ran in {python}")
        spark.stop()


if __name__ == "__main__":
    main()
