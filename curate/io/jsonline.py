"""One JSON-lines line -> a record dict, or a `RawError` saying why it is not one (`parse_json_line`).

Separate from the file reading in curate.io.readers (which re-exports these names) because it touches no
file: parallel ingest parses the lines of its chunks with it, and `readers` uses it for every line it
reads, so both give the same record, or the same reason, for the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from curate.io.read_errors import RawError

MAX_RAW_CHARS = 64 * 1024
NESTED_TOO_DEEP = "JSON nested too deep to parse (more levels than Python's recursion limit)"


def parse_json_line(line: bytes, first: bool = False) -> dict | RawError | None:
    """Parse one JSONL line; None for a blank line. Never raises."""
    if first and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM written by some Windows tools
        line = line[3:]
    line = line.rstrip(b"\r\n")  # so error columns point into the line, not past its end
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawError(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at offset {e.start})", _raw_text(line))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawError(f"malformed JSON: {e.msg} (col {e.colno})", _raw_text(text))
    except RecursionError:
        return RawError(NESTED_TOO_DEEP, _raw_text(text))
    return _as_record(value, text)


def _as_record(value: Any, text: str) -> dict | RawError:
    if isinstance(value, dict):
        return value
    return RawError(f"record is not a JSON object (got {type(value).__name__})", _raw_text(text))


def _raw_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text.rstrip("\r\n")[:MAX_RAW_CHARS]
