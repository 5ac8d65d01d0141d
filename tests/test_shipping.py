"""Shipping what a closure needs: R packages from the driver's library, Python
environments as archives, local modules by value.

On the real standalone cluster of ``test_cluster`` (its fixtures; executors in a venv
without workerbridge, Rscript without the test's packages, both proven first): an R
package built here with ``R CMD INSTALL -l`` into a driver-only library (with a
dependency of its own, also driver-only), called as ``pkg::fn`` and through
``library()`` (``packages=True``); a venv-pack2 archive holding a package the
executors lack; a driver-only local module.  Without Spark: the unpack lock with two
processes at once, the private directory refusing what another user made first, the
checksum; with the suite's local session: a compiled package built for another
platform refused, and a matching version on the node used as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from test_cluster import cluster, executor_python  # noqa: F401 - fixtures, shared
from test_cluster import DRIVER_PYTHON, clean_env, cluster_conf, probe
from test_progress import FakeTTY, last_line

from wbtest import ROOT, RUNTIME
from workerbridge import R, spark_apply, spark_log
from workerbridge.diagnostics import progress
from workerbridge.driver.closure import pack
from workerbridge.driver.gateway import Gateway
from workerbridge.driver.ship_r import resolve
from workerbridge.task.artifacts import Artifact, ShipError, unpack
from workerbridge.task.spec import TaskSpec, WorkerOptions
from workerbridge.task.worker import Worker
from workerbridge.wire.errors import BadInputError, TaskError

ROWS = 2_000

PKG_SOURCES = {
    "wbshipdep": ("0.1.0", "", "offset <- function() 1000"),
    "wbshiptest": ("0.2.0", "Imports: wbshipdep\n", "triple <- function(x) x * 3 + wbshipdep::offset()"),
}


def build_r_library(lib: Path) -> Path:
    """The two test packages, installed with R CMD INSTALL -l into ``lib`` only."""
    src = lib.parent / "rsrc"
    for name, (version, extra, code) in PKG_SOURCES.items():
        (src / name / "R").mkdir(parents=True)
        (src / name / "DESCRIPTION").write_text(
            f"Package: {name}\nVersion: {version}\nTitle: Test\nDescription: A test package.\n"
            f"License: MIT\nAuthor: t\nMaintainer: t <t@example.org>\n{extra}")
        (src / name / "NAMESPACE").write_text(f"export({code.split()[0]})\n")
        (src / name / "R" / "f.R").write_text(code + "\n")
    lib.mkdir(parents=True)
    out = subprocess.run(["R", "CMD", "INSTALL", "-l", str(lib), str(src / "wbshipdep"),
                          str(src / "wbshiptest")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return lib


@pytest.fixture(scope="module")
def driver_lib(tmp_path_factory) -> Path:
    return build_r_library(tmp_path_factory.mktemp("rpkgs") / "driver-lib")


def build_env_archive(root: Path) -> Path:
    """A venv holding ``wbshipenv`` (only there), packed by venv-pack2.  Its interpreter
    reaches this venv's pyarrow, pandas and cloudpickle through a sitecustomize (a .pth
    naming a directory outside the venv is refused by the packer as 'editable')."""
    import venv_pack
    venv = root / "penv"
    subprocess.run([DRIVER_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True,
                   env=clean_env())
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "wbshipenv").mkdir(parents=True)
    (site / "wbshipenv" / "__init__.py").write_text("VALUE = 42\n")
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.append({sysconfig.get_path('purelib')!r})\n")
    out = root / "env.tar.gz"
    venv_pack.pack(prefix=str(venv), output=str(out))
    return out


# ---- the cluster ------------------------------------------------------------------------
CLIENT = r'''
import json, sys, time, traceback
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["module_dir"])
import shiputil                                  # driver-only: beside the driver's script
from pyspark.sql import SparkSession
from workerbridge import R, spark_apply, spark_log
b = SparkSession.builder.master(cfg["master"]).appName("workerbridge-shipping-test")
for k, v in cfg["conf"].items():
    b = b.config(k, v)
spark = b.getOrCreate()
# two partitions: one task per executor, both at once
df = spark.range(cfg["rows"], numPartitions=2).selectExpr("id", "id / 2 AS x")

def with_env(d):
    import sys, wbshipenv
    return d.assign(y=float(wbshipenv.VALUE), exe=sys.executable)

def plain(d):
    import sys
    return d.assign(y=d.x, exe=sys.executable)

SCHEMA = "id long, x double, y double, exe string"
R_PKG = R("function(d) { d$y <- wbshiptest::triple(d$x); d$exe <- R.home(); d }")
R_LIB = R("function(d) { library(wbshiptest); d$y <- triple(d$x); d$exe <- R.home(); d }")
CASES = [
    ("r ship off", R_PKG, {"packages": ["wbshiptest"], "ship": False}),
    ("r pkg::fn", R_PKG, {"packages": ["wbshiptest"]}),
    ("r library, packages=True", R_LIB, {"packages": True}),
    ("python env", with_env, {"python_env": cfg["env_archive"]}),
    ("python after env", plain, {}),
    ("local module", shiputil.bump, {}),
    ("local module, ship off", shiputil.bump, {"ship": False}),
]
out = {}
for name, f, opts in CASES:
    before = len(spark_log(spark, n=None))
    t0 = time.perf_counter()
    res = {}
    try:
        pdf = spark_apply(df, f, schema=SCHEMA, **opts).toPandas()
        res.update(rows=len(pdf), ids=sorted(pdf["id"].tolist()) == list(range(cfg["rows"])),
                   y=pdf.sort_values("id")["y"].tolist()[:3], exe=sorted(set(pdf["exe"])))
    except Exception as e:
        res["error"] = "".join(traceback.format_exception_only(type(e), e))[-4000:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["lines"] = spark_log(spark, n=None)[before:]
    out[name] = res
spark.stop()
print("RESULT " + json.dumps(out), flush=True)
'''


def rscript_lacks(package: str, cwd: Path) -> bool:
    out = subprocess.run(["Rscript", "--vanilla", "-e", f"cat(requireNamespace('{package}', "
                          "quietly = TRUE))"], cwd=str(cwd), env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() == "FALSE"


@pytest.mark.slow
def test_cluster_executors_get_r_packages_python_env_and_local_module(
        cluster, executor_python, driver_lib, tmp_path):  # noqa: F811 - fixtures
    lib = driver_lib
    archive = build_env_archive(tmp_path)
    mods = tmp_path / "driver-modules"
    mods.mkdir()
    (mods / "shiputil.py").write_text("def bump(d):\n    import sys\n"
                                      "    return d.assign(y=d.x * 2, exe=sys.executable)\n")
    # proof first: the executors' R and Python lack all three
    assert rscript_lacks("wbshiptest", tmp_path) and rscript_lacks("wbshipdep", tmp_path)
    for module in ("wbshipenv", "shiputil"):
        p = probe(executor_python, f"import {module}", tmp_path)
        assert f"No module named '{module}'" in p.stderr, (module, p.stdout, p.stderr)

    exec_tmp, driver_tmp = tmp_path / "exec-tmp", tmp_path / "driver-tmp"
    exec_tmp.mkdir()
    driver_tmp.mkdir()
    conf = dict(cluster_conf(cluster, executor_python, tmp_path),
                **{"spark.executorEnv.TMPDIR": str(exec_tmp)})
    cfg = {"master": cluster.url, "conf": conf, "rows": ROWS, "module_dir": str(mods),
           "env_archive": str(archive)}
    (tmp_path / "client.py").write_text(CLIENT)
    proc = subprocess.run([DRIVER_PYTHON, str(tmp_path / "client.py"), json.dumps(cfg)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=420,
                          env=clean_env(PYSPARK_PYTHON=executor_python, R_LIBS=str(lib),
                                        TMPDIR=str(driver_tmp)))
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert found, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(found[-1][len("RESULT "):])
    (tmp_path / "result.json").write_text(json.dumps(res, indent=1))    # to read after a failure

    off = res["r ship off"]
    assert "cannot load R package 'wbshiptest'" in off.get("error", ""), off
    for name in ("r pkg::fn", "r library, packages=True"):
        case = res[name]
        assert "error" not in case, (name, case["error"])
        assert case["rows"] == ROWS and case["ids"] and case["y"] == [1000.0, 1001.5, 1003.0]
    lines = res["r pkg::fn"]["lines"] + res["r library, packages=True"]["lines"]
    assert any("Gateway" in ln and "shipping R packages" in ln and "wbshiptest 0.2.0" in ln
               and "wbshipdep 0.1.0" in ln for ln in lines), lines
    # both executors unpacked at the same time at first: one did, the others waited and reused
    unpacked = [ln for ln in lines if "unpacked the shipped R packages" in ln]
    reused = [ln for ln in lines if "reused the unpacked R packages" in ln]
    assert len(unpacked) == 1 and "from SparkFiles" in unpacked[0], unpacked
    assert len(reused) == 3, reused
    assert sum("uses shipped R packages: wbshiptest 0.2.0, wbshipdep 0.1.0" in ln
               for ln in lines) == 4
    assert str(exec_tmp) in unpacked[0]

    env_case, after = res["python env"], res["python after env"]
    assert "error" not in env_case, env_case["error"]
    assert env_case["rows"] == ROWS and env_case["y"] == [42.0] * 3
    assert len(env_case["exe"]) == 1 and env_case["exe"][0].startswith(str(exec_tmp)), env_case
    assert sum("unpacked the shipped Python environment env.tar.gz" in ln
               for ln in env_case["lines"]) == 1
    assert "error" not in after and after["exe"] == [executor_python], after   # this call only

    local, local_off = res["local module"], res["local module, ship off"]
    assert "error" not in local, local["error"]
    assert local["rows"] == ROWS and local["y"] == [0.0, 1.0, 2.0]
    assert any("closure carries local modules by value: shiputil" in ln for ln in local["lines"])
    assert "No module named 'shiputil'" in local_off.get("error", ""), local_off
    cold = float(unpacked[0].split(" in ")[-1].split(" s ")[0])
    print(f"R bundle: cold unpack {cold:.2f} s; seconds per call: "
          + ", ".join(f"{name} {case['seconds']}" for name, case in res.items()))


# ---- without Spark ----------------------------------------------------------------------
def test_resolve_scans_code_and_follows_dependencies(driver_lib, monkeypatch):
    monkeypatch.setenv("R_LIBS", str(driver_lib))
    code = ("# library(incomment)\nfunction(d) {\n  s <- 'library(instring)'\n"
            "  f <- function(a = stats::median(1)) wbshiptest::triple(a)\n"
            "  require(\"nosuchpkg\")\n  library(p, character.only = TRUE)\n  d\n}\n")
    found, missing = resolve("Rscript", [], code)
    assert sorted(p.name for p in found) == ["wbshipdep", "wbshiptest"]
    assert missing == ["nosuchpkg"]
    found, missing = resolve("Rscript", ["wbshipdep", "stats"], None)     # base: never shipped
    assert [(p.name, p.version, p.compiled) for p in found] == [("wbshipdep", "0.1.0", False)]
    assert missing == []


def _archive(tmp_path: Path, mb: int = 24) -> Artifact:
    data = tmp_path / "payload"
    (data / "d").mkdir(parents=True)
    for i in range(4):
        (data / "d" / f"f{i}").write_bytes(os.urandom(mb * 2**20 // 4))
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(str(data / "d"), arcname="d")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Artifact("test", path.name, sha[:16], sha, path.stat().st_size, str(path))


UNPACK = r'''
import json, sys
from workerbridge.task.artifacts import Artifact, unpack
art = Artifact(**json.loads(sys.argv[1]))
sys.stdin.readline()                              # both start together
got = unpack(art, base=sys.argv[2])
print(json.dumps({"reused": got.reused, "path": got.path, "seconds": got.seconds}))
'''


def test_two_processes_unpack_at_once_one_does_the_work(tmp_path):
    art = _archive(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", UNPACK, json.dumps(art.__dict__), str(base)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out))
    assert sorted(r["reused"] for r in results) == [False, True], results
    final = Path(results[0]["path"])
    assert results[1]["path"] == str(final)
    assert (final / "d" / "f3").read_bytes() == (tmp_path / "payload" / "d" / "f3").read_bytes()
    assert oct(final.stat().st_mode & 0o777) == "0o700"
    left = [p.name for p in final.parent.iterdir()]
    assert sorted(left) == [final.name, final.name + ".lock"], left    # no staging left behind
    again = unpack(art, base=str(base))
    assert again.reused and again.path == str(final)


@pytest.fixture
def open_dir():
    """A directory like /tmp (1777) that another user can reach: pytest's own are 0700."""
    path = Path(tempfile.mkdtemp(prefix="wb-ship-test-"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


def test_unpack_refuses_what_it_does_not_own(tmp_path, open_dir):
    art = _archive(tmp_path, mb=1)
    base = open_dir
    top = base / f"workerbridge-ship-{os.getuid()}"
    top.mkdir(mode=0o755)
    os.chmod(top, 0o755)
    with pytest.raises(ShipError, match="open to other users"):
        unpack(art, base=str(base))
    top.rmdir()
    top.symlink_to(tmp_path)
    with pytest.raises(ShipError, match="not a directory"):
        unpack(art, base=str(base))
    top.unlink()
    if os.getuid() == 0 and shutil.which("setpriv"):
        # another user (nobody) creates our directory's name first
        subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "mkdir", "-m", "700", str(top)], check=True)
        with pytest.raises(ShipError, match="belongs to uid 65534"):
            unpack(art, base=str(base))
    # and a file changed after it was shipped is not unpacked
    mine = tmp_path / "mine"
    mine.mkdir()
    Path(art.driver_path).write_bytes(b"changed")
    with pytest.raises(ShipError, match="does not match the driver's archive"):
        unpack(art, base=str(mine))


# ---- the suite's local session: the node is this machine --------------------------------
def _copy_package(name: str, lib: Path, version: str = "", r_version: str = "",
                  platform: str = "") -> None:
    """The node's own ``name`` copied into ``lib``; optionally claiming another version,
    R and platform, in both places R keeps them (DESCRIPTION and Meta/package.rds)."""
    edit = f"""
    src <- find.package('{name}'); dst <- file.path('{lib}', '{name}')
    stopifnot(file.copy(src, '{lib}', recursive = TRUE))
    if (nzchar('{version}')) {{
      d <- read.dcf(file.path(dst, 'DESCRIPTION'))
      d[, 'Version'] <- '{version}'
      d[, 'Built'] <- sprintf('R {r_version}; {platform}; %s; unix', Sys.Date())
      write.dcf(d, file.path(dst, 'DESCRIPTION'))
      m <- readRDS(file.path(dst, 'Meta', 'package.rds'))
      m$DESCRIPTION[['Version']] <- '{version}'
      m$DESCRIPTION[['Built']] <- d[, 'Built']
      m$Built$R <- numeric_version('{r_version}'); m$Built$Platform <- '{platform}'
      saveRDS(m, file.path(dst, 'Meta', 'package.rds'))
    }}"""
    subprocess.run(["Rscript", "--vanilla", "-e", edit], check=True, capture_output=True,
                   timeout=120)


LATTICE = R("function(d) { d$y <- as.double(packageVersion('lattice') >= '0.1'); d }")


def test_compiled_package_built_for_another_platform_is_refused(spark, tmp_path, monkeypatch):
    # lattice has compiled code; the driver's copy claims another version, R and platform.
    lib = tmp_path / "lib"
    lib.mkdir()
    _copy_package("lattice", lib, version="0.20-99", r_version="3.6.3",
                  platform="aarch64-unknown-linux-gnu")
    monkeypatch.setenv("R_LIBS", str(lib))     # the driver's R only: Spark's workers run already
    df = spark.range(10, numPartitions=1).selectExpr("id", "id / 2 AS x")
    with pytest.raises(Exception) as err:
        spark_apply(df, LATTICE, schema="id long, x double, y double",
                    packages=["lattice"]).collect()
    text = str(err.value)
    assert "the shipped R package 'lattice' 0.20-99 has compiled code built for R 3.6.3 on " \
           "aarch64-unknown-linux-gnu" in text, text[-3000:]
    assert "this node runs R " in text and "Install 'lattice' on this node" in text


def test_matching_version_on_the_node_is_used_as_it_is(spark, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    _copy_package("lattice", lib)
    monkeypatch.setenv("R_LIBS", str(lib))
    df = spark.range(10, numPartitions=1).selectExpr("id", "id / 2 AS x")
    before = len(spark_log(spark, n=None))
    rows = spark_apply(df, LATTICE, schema="id long, x double, y double",
                       packages=["lattice"]).collect()
    assert len(rows) == 10 and all(r.y == 1.0 for r in rows)
    lines = spark_log(spark, n=None)[before:]
    assert any("uses this node's own R packages (the driver's versions): lattice" in ln
               for ln in lines), lines
    assert not any("uses shipped R packages" in ln for ln in lines)
    # the progress line says what was shipped (unpacked now, or a copy from an earlier run)
    out = FakeTTY()
    display = progress.Progress(out, total=1, backend="plain")
    for ln in lines:
        display.feed(ln)
    final = last_line(out.getvalue())
    assert "1/1 partitions" in final and \
        ("shipped: 1 unpacked, 0 reused" in final or "shipped: 0 unpacked, 1 reused" in final), final


def test_local_module_travels_by_value(spark, tmp_path, monkeypatch):
    """A module only this process can import (the children's path lacks tmp_path)."""
    (tmp_path / "wb_local_helper.py").write_text(
        "OFFSET = 7\n\ndef add(d):\n    return d.assign(y=d.id + OFFSET)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import wb_local_helper
    try:
        before = len(spark_log(spark, n=None))
        rows = spark_apply(spark.range(5), wb_local_helper.add, schema="id long, y long").collect()
        assert sorted(r.y for r in rows) == [7, 8, 9, 10, 11]
        assert any("closure carries local modules by value: wb_local_helper" in ln
                   for ln in spark_log(spark, n=None)[before:])
    finally:
        sys.modules.pop("wb_local_helper", None)


def test_python_env_and_python_together_is_refused(spark, tmp_path):
    df = spark.range(3)
    env = tmp_path / "env.tar.gz"
    env.write_bytes(b"")
    with pytest.raises(BadInputError, match="not both"):
        spark_apply(df, lambda d: d, schema="id long", python_env=str(env), python="python3")
    with pytest.raises(BadInputError, match="no such file"):
        spark_apply(df, lambda d: d, schema="id long", python_env=str(tmp_path / "none.tar.gz"))


def test_worker_names_a_shipped_archive_it_cannot_use(tmp_path, monkeypatch):
    """The Worker as a task runs it: an archive changed after shipping, and one that is
    no archive at all, fail the task with the partition, the language and a hint."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # the ship base: ours alone
    good = _archive(tmp_path, mb=1)
    junk = tmp_path / "junk.wbship"
    junk.write_bytes(b"not a tar file")
    sha = hashlib.sha256(junk.read_bytes()).hexdigest()
    cases = {
        "does not match the driver's archive": Artifact(good.kind, good.name, good.digest,
                                                        "0" * 64, good.size, good.driver_path),
        "cannot be unpacked": Artifact("test", junk.name, sha[:16], sha, 14, str(junk)),
    }
    gw = Gateway(log_path=None)
    try:
        for words, art in cases.items():
            spec = TaskSpec(pack(lambda d: d), RUNTIME.digest, None, gw.address,
                            WorkerOptions(), None, ship=(art,))
            with pytest.raises(TaskError) as err:
                list(Worker(spec, 3, "ship", root=ROOT).run(pa.table({"x": [1, 2]}).to_batches()))
            text = str(err.value)
            assert "PyScript (Python) failed in partition 3: cannot use the shipped" in text
            assert words in text and "Hint:" in text, text
    finally:
        gw.stop()
