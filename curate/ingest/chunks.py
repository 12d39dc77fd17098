"""One chunk of input records -> canonical rows and quarantine rows: the per-record half of ingest.

It is a pure function of the chunk, so it runs the same in this process or in a helper process
(ingest.pool); deduplication and sharding, which need the whole corpus in order, stay with the caller.
Chunks never split what must be read together (a WebShop session), so chunked results concatenated
in order are exactly what one pass over the file gives."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from curate import schema
from curate.formats import adapters
from curate.io.quarantine import RAW_LIMIT
from curate.io.readers import RawError, parse_json_line

CHUNK_BYTES = 1 << 18  # JSON-lines chunk: ~1k typical records; a widened pipe queues one more
CHUNK_ITEMS = 4096     # records per chunk for the other readers
_FRAME = struct.Struct("<QQ")
_scan = json.JSONDecoder().scan_once


@dataclass
class ChunkResult:
    """One chunk's result (`normalize_items`): canonical rows, quarantine rows and notes, in source order."""

    records: pa.Table  # canonical rows in source order, duplicates included (dedup is corpus-wide)
    bad: list[dict]    # quarantine rows in source order
    notes: dict[int, list[str]] = field(default_factory=dict)  # row of `records` -> its Normalized.notes

    @property
    def n_items(self) -> int:
        """Input items the chunk held: its rows plus its quarantined records."""
        return self.records.num_rows + len(self.bad)


def normalize_items(source: str, items: Iterable[tuple[int, dict | RawError]], fmt: str,
                    tools: str | None = None) -> ChunkResult:
    """`tools`: default tools for records without their own (see adapters.normalize)."""
    bad, index, ids, formats, truths, rewards, offsets, messages, record_tools = [], [], [], [], [], [], [0], [], []
    metadata: list[str | None] = []
    notes: dict[int, list[str]] = {}
    for i, raw, result in adapters.iter_normalized(source, items, fmt, tools):
        if not isinstance(result, adapters.BadRecord):
            try:
                rid = adapters.record_id(result)
            except Exception as e:  # any failure on one record is its quarantine reason, never the run's
                result = adapters.BadRecord(f"{type(e).__name__}: {e}")
        if isinstance(result, adapters.BadRecord):
            bad.append({"source": source, "source_index": i, "stage": "ingest", "reason": str(result),
                        "raw": _raw_text(raw)})
            continue
        if result.notes:
            notes[len(ids)] = list(result.notes)
        index.append(i)
        ids.append(rid)
        formats.append(result.format)
        truths.append(result.ground_truth)
        rewards.append(result.reward)
        record_tools.append(result.tools)
        metadata.append(result.metadata)
        messages += result.messages
        offsets.append(len(messages))
    table = _record_table(source, index, ids, formats, truths, rewards, offsets, messages, record_tools, metadata)
    return ChunkResult(table, bad, notes)


def _record_table(source, index, ids, formats, truths, rewards, offsets, messages, tools, metadata) -> pa.Table:
    """The RECORD table from flat columns: Arrow builds it without a Python dict per row. Chunks
    without tool fields (most data) take the fast path: role and content columns, the rest null."""
    target = schema.arrow_schema(schema.RECORD)
    message = target.field("messages").type.value_type
    n = len(messages)
    children = [pa.array([m["role"] for m in messages], pa.string()),
                pa.array([m["content"] for m in messages], pa.string())]
    extended = any(len(m) > 2 for m in messages)
    for f in list(message)[2:]:
        children.append(pa.array([m.get(f.name) for m in messages], f.type) if extended else pa.nulls(n, f.type))
    messages_array = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                              pa.StructArray.from_arrays(children, fields=list(message)))
    columns = {"id": pa.array(ids, pa.string()), "source": pa.array([source] * len(ids), pa.string()),
               "source_index": pa.array(index, pa.int64()), "format": pa.array(formats, pa.string()),
               "messages": messages_array, "tools": pa.array(tools, pa.string()),
               "ground_truth": pa.array(truths, pa.string()), "reward": pa.array(rewards, pa.float64()),
               "metadata": pa.array(metadata, pa.string())}
    return pa.table([columns[name] for name in target.names], schema=target)


def normalize_lines(source: str, start: int, data: bytes, fmt: str, tools: str | None = None) -> ChunkResult:
    """A chunk of JSON lines (`data`, whose first line is line `start` of the file)."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    try:  # decoded once for the chunk; a chunk with bad UTF-8 is parsed line by line, to name the line
        texts = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        texts = None
    return normalize_items(source, _parsed(lines, texts, start), fmt, tools)


def _parsed(lines: list[bytes], texts: list[str] | None, start: int) -> Iterator[tuple[int, dict | RawError]]:
    """`readers.parse_json_line` of each line, with a fast path for a good object: json's scanner on the
    already decoded text. Anything else (blank, bad, BOM, not an object) takes parse_json_line itself."""
    for i, line in enumerate(lines):
        rec = None
        if texts is not None:
            try:  # what json.loads does after skipping leading whitespace (of which a good line has none)
                rec, end = _scan(texts[i], 0)
                if end != len(texts[i]) and not texts[i][end:].isspace():
                    rec = None
            except (StopIteration, ValueError, RecursionError):  # parse_json_line says what is wrong
                pass
        if type(rec) is not dict:
            rec = parse_json_line(line, first=start + i == 0)
            if rec is None:
                continue
        yield start + i, rec


def continues(fmt: str) -> Callable[[bytes, bool], bool]:
    """For readers.read_json_line_chunks: may the record on this line go on in the next one?"""
    def check(line: bytes, first: bool) -> bool:
        rec = parse_json_line(line, first)
        return rec is None or adapters.is_session_line(rec, fmt)
    return check


def item_chunks(items: Iterator[tuple[int, dict | RawError]], fmt: str) -> Iterator[list]:
    """Records of a non-JSON-lines reader in chunks of about CHUNK_ITEMS, sessions kept whole."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= CHUNK_ITEMS and not adapters.is_session_line(item[1], fmt):
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _raw_text(raw) -> str:
    if isinstance(raw, str):
        return raw[:RAW_LIMIT]
    try:
        return json.dumps(raw, ensure_ascii=False, default=str)[:RAW_LIMIT]
    except (RecursionError, ValueError, TypeError) as e:  # the record stays quarantined, with what can be said
        return f"(the record cannot be written back as JSON: {type(e).__name__})"


# ------------------------------------------------------------------ bytes between processes (no pickle)


def encode(result: ChunkResult) -> bytes:
    """Arrow IPC for the rows; JSON for quarantine rows, whose raw text may hold lone surrogates that
    UTF-8 (and so Arrow) cannot, but an ASCII JSON escape can."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, result.records.schema) as writer:
        writer.write_table(result.records)
    rows, bad = sink.getvalue(), json.dumps({"bad": result.bad, "notes": result.notes}).encode()
    return _FRAME.pack(rows.size, len(bad)) + rows.to_pybytes() + bad


def read_encoded(read: Callable[[int], bytes]) -> ChunkResult | None:
    """Decode one frame from a stream (`read(n)` returns n bytes, fewer at its end); None at its end."""
    header = read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    n_rows, n_bad = _FRAME.unpack(header)
    rows, bad = read(n_rows), read(n_bad)
    if len(rows) < n_rows or len(bad) < n_bad:
        return None
    side = json.loads(bad)
    notes = {int(row): found for row, found in side["notes"].items()}  # JSON keys are strings
    return ChunkResult(pa.ipc.open_stream(pa.py_buffer(rows)).read_all(), side["bad"], notes)
