"""The closure: what a task ships to its child, packed once on the driver.

Covers: :class:`R` (R code given as text or a file), :class:`RFunction` (an R
function serialized by R itself, as the R package sends it), packing a Python callable
with cloudpickle (naming the captured object that cannot be pickled), the
context, and the content hash that lets a warm child skip reloading it.  Does
not cover: running it (``worker``, the children).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..task.spec import PYTHON, R_LANG, Closure
from ..wire.errors import R_INSTALL_HINT, BadInputError



_PARSED: set = set()       # (Rscript, sha256 of the code) that parsed: not checked again
_PARSED_MAX = 1024


class R:
    """R code whose value is a function ``function(df)`` or ``function(df, context)``.

    >>> R("function(df) df").source
    'function(df) df'
    """

    def __init__(self, code: Optional[str] = None, *, path: Union[str, Path, None] = None):
        if (code is None) == (path is None):
            raise BadInputError("R() takes R code as text or path=, exactly one of them")
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise BadInputError(f"R(path={str(path)!r}): no such file")
            code = p.read_text("utf-8")
            self.origin = str(p)
        else:
            self.origin = "<R code>"
        if not isinstance(code, str):
            raise BadInputError(f"R() takes a string of R code, not {type(code).__name__}")
        if "\0" in code:
            raise BadInputError("R code cannot contain NUL bytes")
        if not code.strip():
            raise BadInputError("R code is empty; give R code whose value is a function")
        self.source: str = code

    def __repr__(self) -> str:
        first = self.source.strip().splitlines()[0]
        return f"R({first[:60]!r}{'...' if len(first) > 60 else ''})"

    def check_syntax(self, rscript: str) -> None:
        """Parse the code with ``rscript`` on the driver; a clear error at the first problem.

        A code that parsed once with the same Rscript is not parsed again: the
        check starts an R process (~0.15 s), which a job run in a loop would
        otherwise pay on every call."""
        exe = shutil.which(rscript)
        if exe is None:
            raise BadInputError(
                f"Rscript not found as {rscript!r} on the driver; {R_INSTALL_HINT} "
                "or pass rscript='/path/to/Rscript'")
        key = (exe, hashlib.sha256(self.source.encode("utf-8")).hexdigest())
        if key in _PARSED:
            return
        # Parse only: top-level code is not run on the driver (it may need
        # packages that only the nodes have).  A code whose value is plainly
        # not a function (a constant) is refused here too.
        probe = ("src <- readLines(file('stdin'), warn = FALSE, encoding = 'UTF-8');"
                 "r <- tryCatch({ exprs <- parse(text = src, keep.source = FALSE);"
                 " if (length(exprs) == 0L) 'ERR the code has no expression'"
                 " else if (is.atomic(exprs[[length(exprs)]]))"
                 "  'NOTFN the value of the code is a constant, not a function'"
                 " else 'OK' },"
                 " error = function(e) paste('ERR', conditionMessage(e)));"
                 "cat(r, '\\n', sep = '')")
        try:
            out = subprocess.run([exe, "--vanilla", "-e", probe], input=self.source.encode("utf-8"),
                                 capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise BadInputError("checking the R code's syntax took over 60 s") from None
        text = out.stdout.decode("utf-8", "replace").strip()
        if text.startswith("OK"):
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED.add(key)
            return
        if text.startswith("ERR"):
            raise BadInputError(f"R syntax error in {self.origin}: {text[4:]}")
        if text.startswith("NOTFN"):
            raise BadInputError(f"R code in {self.origin} is not a function: {text[6:]}; "
                                "write R('function(df) ...')")
        raise BadInputError(f"could not check the R code with {exe}: "
                            f"{out.stderr.decode('utf-8', 'replace')[-800:]}")


class RFunction:
    """An R function as R's ``serialize()`` wrote it, with what it needs.

    The R package's ``spark_apply`` builds it: the function, the global
    variables and helper functions it uses, and its context, in one XDR
    serialization.  The child ``unserialize()``s it only after the handshake.

    >>> RFunction(b"X\\n...").payload[:2]
    b'X\\n'
    """

    def __init__(self, payload: Union[bytes, bytearray, memoryview]):
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        if not isinstance(payload, bytes) or payload[:2] != b"X\n":
            raise BadInputError("RFunction() takes the bytes of R's serialize(x, NULL) "
                                "(XDR format, starting with 'X\\n')")
        self.payload: bytes = payload

    def __repr__(self) -> str:
        return f"RFunction({len(self.payload)} bytes)"


def pack(f: Union[Callable, R], context: Any = None, options: Optional[dict] = None) -> Closure:
    """A :class:`Closure` for a Python callable or an :class:`R`."""
    options = dict(options or {})
    if isinstance(f, RFunction):
        if context is not None:
            raise BadInputError("an RFunction carries its context inside it; "
                                "pass context= to the R package's spark_apply")
        options["closure_format"] = "serialized"
        return Closure(R_LANG, f.payload, None, options, _digest(f.payload))
    if isinstance(f, R):
        ctx = _context_json(context)
        code = f.source.encode("utf-8")
        return Closure(R_LANG, code, ctx, options, _digest(code, ctx.encode("utf-8")))
    if isinstance(f, str):
        raise BadInputError("f is a string; wrap R code as R('function(df) ...') "
                            "or pass a Python callable")
    if not callable(f):
        raise BadInputError(f"f must be a Python callable or R(...), not {type(f).__name__}")
    code = _pickle({"func": f, "context": context}, f)
    return Closure(PYTHON, code, None, options, _digest(code))


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:32]


def _pickle(obj: Any, f: Callable) -> bytes:
    import cloudpickle
    try:
        return cloudpickle.dumps(obj)
    except Exception as e:
        culprit = _unpicklable_capture(f)
        where = f" (the captured {culprit})" if culprit else ""
        raise BadInputError(
            f"cannot serialize the closure {getattr(f, '__qualname__', f)!r}{where}: "
            f"{type(e).__name__}: {e}. Hint: create such objects inside the function, "
            "or pass plain data through context=") from e


def _unpicklable_capture(f: Callable) -> Optional[str]:
    """The first captured variable or global of ``f`` that cloudpickle refuses."""
    import cloudpickle
    code = getattr(f, "__code__", None)
    if code is None:
        return None
    candidates = []
    for name, cell in zip(code.co_freevars, getattr(f, "__closure__", None) or ()):
        try:
            candidates.append((f"variable {name!r}", cell.cell_contents))
        except ValueError:
            pass
    g = getattr(f, "__globals__", {})
    candidates += [(f"global {n!r}", g[n]) for n in code.co_names if n in g]
    for label, value in candidates:
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{label} of type {type(value).__name__}"
    return None


MAX_R_CONTEXT_BYTES = 64 << 20


def _context_json(context: Any) -> str:
    """The context for an R closure as JSON (numbers, strings, bools, lists, dicts,
    pandas DataFrames as column lists)."""
    def default(o):
        try:
            import pandas as pd
            if isinstance(o, pd.DataFrame):
                return {str(k): _plain(v) for k, v in o.to_dict(orient="list").items()}
        except ImportError:
            pass
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, (set, frozenset, tuple)):
            return list(o)
        raise TypeError(f"a {type(o).__name__} cannot travel to R")
    try:
        text = json.dumps(_finite(context), default=default, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise BadInputError(
            f"context= cannot be sent to an R closure: {e}. R contexts are JSON-like: "
            "numbers, strings, bools, None, lists, dicts and pandas DataFrames") from None
    if len(text) > MAX_R_CONTEXT_BYTES:
        raise BadInputError(
            f"context= is {len(text) / 2**20:.0f} MB as JSON; an R context may be at most "
            f"{MAX_R_CONTEXT_BYTES >> 20} MB. Put large data in a DataFrame and join it instead")
    return text


def _plain(values: list) -> list:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("Inf" if o > 0 else "-Inf")
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o
