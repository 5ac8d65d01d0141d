"""rscripts/protocol.R holds the same constant table as workerbridge.protocol,
and its JSON encoder/decoder round-trips what Python's json module writes.

Runs the real Rscript (base R only)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import pytest

from workerbridge.wire import protocol
from workerbridge.wire.lifecycle import MESSAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL_R = os.path.join(ROOT, "rscripts", "protocol.R")
RSCRIPT = shutil.which("Rscript") or "/usr/bin/Rscript"

pytestmark = pytest.mark.skipif(not os.path.exists(RSCRIPT), reason="Rscript not installed")


def run_r(code: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RSCRIPT, "--vanilla", "-e", code], input=stdin,
                          capture_output=True, timeout=timeout)


def test_constant_table_matches_python():
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    for (nm in names(WB_MESSAGE_TYPES)) cat("MT", nm, WB_MESSAGE_TYPES[[nm]], "\\n")
    cat("MTCLASS", class(WB_MESSAGE_TYPES), "\\n")
    cat("PROTOCOL_VERSION", WB_PROTOCOL_VERSION, "\\n")
    cat("HEADER_BYTES", WB_HEADER_BYTES, "\\n")
    cat("MAX_AUTH_BYTES", format(WB_MAX_AUTH_BYTES, scientific = FALSE), "\\n")
    cat("MAX_FRAME_BYTES", format(WB_MAX_FRAME_BYTES, scientific = FALSE), "\\n")
    cat("SECRET_BYTES", WB_SECRET_BYTES, "\\n")
    cat("ENV_PORT", WB_ENV_PORT, "\\n")
    cat("ENV_HOST", WB_ENV_HOST, "\\n")
    """
    res = run_r(code)
    assert res.returncode == 0, res.stderr.decode()
    types: dict[str, int] = {}
    consts: dict[str, str] = {}
    for line in res.stdout.decode().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "MT":
            assert parts[1] not in types, f"duplicate name {parts[1]}"
            types[parts[1]] = int(parts[2])
        else:
            consts[parts[0]] = " ".join(parts[1:])
    assert types == protocol.MESSAGE_TYPES
    assert list(types) == list(protocol.MESSAGE_TYPES)          # same order too
    assert consts["MTCLASS"] == "integer"
    assert int(consts["PROTOCOL_VERSION"]) == protocol.PROTOCOL_VERSION
    assert int(consts["HEADER_BYTES"]) == protocol.HEADER_BYTES
    assert int(consts["MAX_AUTH_BYTES"]) == protocol.MAX_AUTH_BYTES
    assert int(consts["MAX_FRAME_BYTES"]) == protocol.MAX_FRAME_BYTES
    assert int(consts["SECRET_BYTES"]) == protocol.SECRET_BYTES
    assert consts["ENV_PORT"] == protocol.ENV_PORT
    assert consts["ENV_HOST"] == protocol.ENV_HOST


def test_frame_header_layout():
    """R packs headers exactly like protocol.pack_header and parses Python's frames."""
    frames = (protocol.pack_header(protocol.TASK, 5) + b"hello"
              + protocol.pack_header(protocol.BYE, 0)
              + protocol.pack_header(protocol.LOG, 3) + b"abc")
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    cat(paste(as.character(wb_pack_header(WB_MESSAGE_TYPES[["DONE"]], 4000000000)), collapse = ""), "\\n")
    con <- file("stdin", "rb")
    for (i in 1:3) {{ fr <- wb_recv_frame(con); cat(fr$name, rawToChar(fr$payload), "\\n") }}
    r <- tryCatch(wb_recv_frame(con), error = function(e) e)
    cat(class(r)[1], r$got, conditionMessage(r), "\\n")
    """
    res = run_r(code, stdin=frames)
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    assert lines[0].strip() == protocol.pack_header(protocol.DONE, 4000000000).hex()
    assert lines[1].split() == ["TASK", "hello"]
    assert lines[2].split() == ["BYE"]
    assert lines[3].split() == ["LOG", "abc"]
    assert lines[4].startswith("wb_peer_closed 0 connection closed after 0 of 8 bytes")


@pytest.mark.parametrize("data, needle", [
    (protocol.pack_header(99, 0), "unknown message type 99"),
    (protocol.pack_header(protocol.LOG, protocol.MAX_FRAME_BYTES + 1), "announces 1073741825 bytes"),
    (protocol.pack_header(protocol.LOG, 10) + b"abc", "connection closed after 3 of 10 bytes"),
    (b"\x00\x00\x00", "connection closed after 3 of 8 bytes"),
])
def test_frame_errors(data, needle):
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    con <- file("stdin", "rb")
    wb_recv_frame(con)
    """
    res = run_r(code, stdin=data)
    assert res.returncode != 0
    assert needle in res.stderr.decode()


NESTED = {
    "ascii": "plain",
    "unicode": "héllo wörld — 中文 — emoji 😀 — \u2028 — \u00a0",
    "escapes": "quote \" backslash \\ slash / newline \n tab \t cr \r bell \u0007 \u001f",
    "empty": "",
    "ints": [1, -2, 3, 2147483647, -2147483647],
    "big": 12345678901,
    "floats": [0.1, -2.5e-10, 1e300, 3.141592653589793, 1 / 3],
    "mixed": [1, "two", None, True, {"k": [1, 2]}],
    "bools": [True, False],
    "null": None,
    "nested": {"a": {"b": {"c": ["x", "ÿ", "\U0001f600"]}}, "empty_obj": {}, "empty_list": []},
    "with_nulls": [1.5, None, 2.5],
    "strings": ["a", "b", "", "ü"],
    "one": [7],
    "one_str": ["solo"],
    "list_of_lists": [[1, 2], [3], []],
    "objects": [{"x": 1}, {"y": "z"}],
    "true": True,
    "false": False,
    "zero": 0,
    "negzero": -0.5,
    "key with spaces and ü": 1,
}


@pytest.mark.parametrize("simplify", ["TRUE", "FALSE"])
def test_json_round_trip(simplify, tmp_path):
    out_path = tmp_path / "out.json"
    payload = json.dumps(NESTED, ensure_ascii=False).encode("utf-8")
    payload_ascii = json.dumps(NESTED, ensure_ascii=True).encode("ascii")
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    con <- file("stdin", "rb")
    lines <- readLines(con, encoding = "UTF-8")
    out <- file({json.dumps(str(tmp_path / "out.json"))}, "wb")
    for (ln in lines) {{
      x <- wb_json_decode(ln, simplify = {simplify})
      writeBin(charToRaw(paste0(wb_json_encode(x), "\\n")), out)
    }}
    close(out)
    """
    res = run_r(code, stdin=payload + b"\n" + payload_ascii + b"\n")
    assert res.returncode == 0, res.stderr.decode()
    out_lines = out_path.read_bytes().split(b"\n")
    assert json.loads(out_lines[0].decode("utf-8")) == NESTED
    assert json.loads(out_lines[1].decode("utf-8")) == NESTED
    # non-ASCII is written as UTF-8, not escaped
    assert "中文".encode("utf-8") in out_lines[0]


def test_json_decode_shapes():
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    x <- wb_json_decode('{{"a":[1,2,3],"b":["x","y"],"c":[true,null],"d":{{}},"e":[],"f":null,"g":[1,"a"],"h":1.5,"i":"\\\\ud83d\\\\ude00"}}')
    cat(class(x$a), length(x$a), class(x$b), class(x$c), is.na(x$c[2]), is.list(x$d), length(names(x$d)),
        is.list(x$e), is.null(x$f), "f" %in% names(x), is.list(x$g), class(x$h),
        utf8ToInt(x$i) == 0x1F600, Encoding(x$i), "\\n")
    r <- tryCatch(wb_json_decode('{{"a":}}'), error = function(e) conditionMessage(e))
    cat(r, "\\n")
    """
    res = run_r(code)
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["integer", "3", "character", "logical", "TRUE", "TRUE", "0", "TRUE",
                                "TRUE", "TRUE", "TRUE", "numeric", "TRUE", "UTF-8"]
    assert "JSON parse error" in lines[1]


def test_lifecycle_vocabulary_matches_python():
    """The lines the R child writes are the templates the diagnostics parse."""
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    for (nm in names(WB_LIFECYCLE)) cat(nm, "\\t", WB_LIFECYCLE[[nm]], "\\n", sep = "")
    cat("FILLED\\t", wb_lifecycle("applied", rows = 150000, detail = " in 3 groups"), "\\n", sep = "")
    """
    res = run_r(code)
    assert res.returncode == 0, res.stderr.decode()
    rows = dict(line.split("\t", 1) for line in res.stdout.decode().splitlines() if line)
    filled = rows.pop("FILLED")
    child = {m.name: m.template for m in MESSAGES.values() if m.writer == "child"}
    assert rows == child
    assert MESSAGES["applied"].match(filled) == {"rows": "150000", "groups": "3", "batches": None}


def test_log_record_json_equals_the_general_encoder(tmp_path):
    """wb_log_json, the LOG lines' short path, gives the general encoder's
    bytes for generated messages (quotes, backslashes, every control
    character but NUL, non-ASCII, astral), and JSON that decodes to them."""
    rng = random.Random(11)
    pools = [range(1, 32), [34, 92, 47], range(32, 127), range(0xA0, 0x800), range(0x4E00, 0x4F00),
             range(0x1F600, 0x1F650)]
    messages = ["", "finished", 'say "hi"\\there\n'] + [
        "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randrange(0, 40)))
        for _ in range(300)]
    src = tmp_path / "messages.json"
    src.write_text(json.dumps(messages), encoding="utf-8")
    out = tmp_path / "out.txt"
    code = f"""
    source({json.dumps(PROTOCOL_R)})
    msgs <- wb_json_decode(rawToChar(readBin({json.dumps(str(src))}, "raw", 1e7)), simplify = FALSE)
    con <- file({json.dumps(str(out))}, "wb")
    for (m in msgs) {{
      fast <- wb_log_json("WARN", "RClosure", m)
      if (!identical(fast, wb_json_encode(list(level = "WARN", role = "RClosure", message = m))))
        stop("differs for: ", m)
      writeBin(charToRaw(paste0(fast, "\\n")), con)
    }}
    # not one string: the general encoder's answer
    stopifnot(identical(wb_log_json("INFO", "RScript", c("a", "b")),
                        wb_json_encode(list(level = "INFO", role = "RScript", message = c("a", "b")))))
    close(con)
    """
    res = run_r(code)
    assert res.returncode == 0, res.stderr.decode()
    lines = out.read_bytes().decode("utf-8").split("\n")[:-1]
    assert [json.loads(ln) for ln in lines] == [
        {"level": "WARN", "role": "RClosure", "message": m} for m in messages]
