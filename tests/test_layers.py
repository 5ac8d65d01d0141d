"""The package's layers, read from its own imports: each layer imports only the
layers below it, no module imports a private name from another, and there is no
import cycle.  The child layer must stay importable without pyspark."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "workerbridge"
# layer -> the layers it may import (itself included); "" is the package root,
# which holds only __version__ and the lazily imported public names
ALLOWED = {
    "wire": {"wire"},
    "child": {"child", "wire"},
    "task": {"task", "wire"},
    "diagnostics": {"diagnostics", "wire"},
    "driver": {"driver", "task", "diagnostics", "wire"},
    "cli": {"cli", "driver", "task", "diagnostics", "wire"},
    "": {"", "wire", "task", "child", "driver", "diagnostics", "cli"},   # __init__
}


def modules() -> dict:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(name: str, path: Path) -> list:
    """(target module, imported name or None) for every import in the file."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, a.name) for a in node.names]
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def edges() -> dict:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        for target, attr in imports(name, path):
            sub = f"{target}.{attr}" if attr else None
            if sub in mods:
                target, attr = sub, None
            if target in mods and target != name:
                graph.setdefault(name, set()).add((target, attr))
    return graph


def test_layers_point_down_only():
    wrong = [f"{src} imports {dst}" for src, outs in edges().items() for dst, attr in outs
             if layer(dst) not in ALLOWED[layer(src)]
             and not (dst == "workerbridge" and attr == "__version__")]
    assert not wrong, wrong


def test_no_private_name_crosses_modules():
    wrong = [f"{src} imports {attr} from {dst}" for src, outs in edges().items()
             for dst, attr in outs
             if attr and attr.startswith("_") and not attr.startswith("__")]
    assert not wrong, wrong


def test_no_import_cycle():
    graph = {src: {dst for dst, _ in outs} for src, outs in edges().items()}
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_child_imports_without_pyspark():
    """The Python child runs in interpreters that have no pyspark."""
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "import workerbridge.child.python, workerbridge.wire.lifecycle\n"
            "print(sorted(m for m in sys.modules if m.startswith('workerbridge')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(PKG.parent))
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)
    assert all(m.split(".")[1] in ("child", "wire") for m in loaded if "." in m), loaded
