"""Stage `ingest`: raw files -> canonical records in fixed-size shards, in input order.

This is the stage that makes the shards, so it runs over the whole input rather than one shard: it
streams records, drops exact duplicates (same content id, first one kept) and quarantines bad records
with their file, line and reason. Nothing is held beyond one shard."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from curate import schema
from curate.formats import adapters
from curate.io import readers
from curate.io.atomic import file_sha256, stable_hash

RAW_LIMIT = 64 * 1024  # quarantine keeps at most this much of a bad record's text


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)   # files or folders, read recursively
    format: str = "auto"                              # or one of adapters.FORMATS, forced for every record
    shard_size: int = 256                             # records per shard: the unit of work and resume
    limit: int | None = None                          # stop after the first N unique records


@dataclass
class IngestResult:
    shards: list[pa.Table] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"input": 0, "duplicates": 0, "quarantined": 0})
    files: list[dict] = field(default_factory=list)


def input_fingerprint(config: IngestConfig) -> list[dict]:
    """The input files with their content hashes (a folder unit: hash of its files' hashes)."""
    out = []
    for path in readers.list_input_files(config.inputs):
        digest = (file_sha256(path) if path.is_file() else
                  stable_hash([file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()]))
        out.append({"path": str(path), "sha256": digest})
    return out


def _raw_text(raw) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text[:RAW_LIMIT]


def ingest(config: IngestConfig, write_shard: Callable[[int, pa.Table], None]) -> IngestResult:
    """Stream every input record; call write_shard(i, table) for each full shard as it fills."""
    res = IngestResult(files=input_fingerprint(config))
    seen: set[str] = set()
    buf: list[dict] = []
    n_shards = 0

    def flush():
        nonlocal n_shards, buf
        write_shard(n_shards, pa.Table.from_pylist(buf, schema=schema.arrow_schema(schema.RECORD)))
        n_shards, buf = n_shards + 1, []

    for source, index, raw, result in _normalized(config):
        res.counts["input"] += 1
        if isinstance(result, adapters.BadRecord):
            res.quarantine.append({"source": source, "source_index": index, "stage": "ingest",
                                   "reason": str(result), "raw": _raw_text(raw)})
            continue
        rid = adapters.record_id(result)
        if rid in seen:
            res.counts["duplicates"] += 1
            continue
        seen.add(rid)
        buf.append({"id": rid, "source": source, "source_index": index, "format": result.format,
                    "messages": result.messages, "ground_truth": result.ground_truth, "reward": result.reward})
        if len(buf) == config.shard_size:
            flush()
        if config.limit is not None and len(seen) >= config.limit:
            break  # --limit reads no further, so the counts still reconcile
    if buf:
        flush()
    res.counts["quarantined"] = len(res.quarantine)
    res.counts["shards"] = n_shards
    return res


def _normalized(config: IngestConfig) -> Iterator[tuple[str, int, object, object]]:
    for path in readers.list_input_files(config.inputs):
        items = readers.read_records(Path(path))
        for index, raw, result in adapters.iter_normalized(path, items, config.format):
            yield str(path), index, raw, result
