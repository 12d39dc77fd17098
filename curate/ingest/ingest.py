"""Stage `ingest`: raw files -> canonical records in fixed-size shards, in input order.

This is the stage that makes the shards, so it runs over the whole input rather than one shard: it
streams records, drops exact duplicates (same content id, first one kept) and quarantines bad records
with their file, line and reason. Nothing is held beyond a few chunks and one shard, except the set of
ids seen (for deduplication: about 140 bytes per unique record).

Parsing and normalising, most of the work, is done chunk by chunk (ingest.chunks); JSON-lines chunks go
to helper processes (ingest.pool) when the input is large enough to pay for starting them. Their
results are taken in input order, so the shards are the same bytes with or without helpers.

A file that cannot be read raises `readers.UnreadableFile` naming it; with `skip_bad_files` it is
listed in `IngestResult.skipped` instead (records read before a mid-file error stay counted). Everything
else the input folders hold and ingest does not read (files of another type, hidden files, curate's own
outputs, DatasetDict splits not chosen with `split`, the --tools file) is listed there too, with
`records_read` 0: nothing is left out without a word."""

from __future__ import annotations

import gc
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from curate import schema
from curate.formats.tools import load_tools_file
from curate.io import readers
from curate.io.atomic import file_sha256, stable_hash
from curate.ingest import chunks
from curate.ingest.pool import HelperPool, usable_cpus
from curate.stages.base import config_key, keyed, no_effect

# Below this much JSON lines, starting helpers (~0.25 s) costs more than it saves (break-even ~11 MiB).
HELPERS_MIN_BYTES = 12 << 20
# The version of what ingest makes of a record (ground-truth rules, number text, metadata), part of the
# cache key with the record columns: a cache made by other rules is not reused.
INGEST_RULES = 3  # 3: WebShop goals and reward breakdowns, a Self-Instruct task's other instances in metadata


@dataclass
class IngestConfig:
    """Options of ingest (the fields' comments); its shards are keyed by `cache_fields`."""

    inputs: list[str] = field(default_factory=list)   # files or folders, read recursively
    format: str = "auto"                              # or one of adapters.FORMATS, forced for every record
    shard_size: int = 256                             # records per shard: the unit of work and resume
    limit: int | None = None                          # stop after the first N unique records
    skip_bad_files: bool = False                      # list unreadable files instead of failing
    parse_procs: int | None = no_effect(None)         # helper processes; None: one per CPU for large input
    tools: str | None = keyed(None, lambda c: c.tools_key())  # --tools FILE: schemas for records without their own
    split: str | None = None                          # DatasetDict inputs: the split read (None: train; "all")

    def cache_fields(self) -> dict:
        """What the shards depend on (stages.base.config_key: every field but the number of processes that
        made them; the tools file by content), and the rules and the columns of this version of ingest."""
        return {**config_key(self), "rules": {"version": INGEST_RULES, "columns": list(schema.columns(schema.RECORD))}}

    def tools_key(self) -> dict | None:
        """The --tools file in the cache key: its path and content (ValueError naming a missing or bad file)."""
        if self.tools is None:
            return None
        self.default_tools()  # a missing or bad file is named before it is hashed
        return {"path": self.tools, "sha256": file_sha256(Path(self.tools))}

    def default_tools(self) -> str | None:
        """The canonical JSON text of the --tools file (ValueError naming the file when it is bad)."""
        return None if self.tools is None else load_tools_file(self.tools)


@dataclass
class IngestResult:
    """What `ingest` found: quarantine rows (when no sink is given), counts, notes, the files read and those
    skipped."""

    quarantine: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"input": 0, "duplicates": 0, "quarantined": 0})
    notes: dict = field(default_factory=dict)  # note -> records kept (not duplicates) that have it
    files: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "records_read"}


def input_fingerprint(config: IngestConfig) -> list[dict]:
    """The input files with their content hashes (a folder unit: hash of its files' hashes), then what the
    input folders hold and ingest does not read, as {"path", "sha256": None, "skipped": reason}, so that
    the cache key changes with it (a new .csv is listed by the next run) -- except hidden entries and
    curate's own outputs and caches, which come and go between runs. `ingest` takes the files only."""
    out = []
    tools = _tools_path(config)
    listing = readers.scan_inputs(config.inputs, config.split, config.skip_bad_files)
    for path in listing.units:
        if tools is not None and path.resolve() == tools:
            continue  # --tools FILE inside an input folder (τ-bench ships it so) is the tools, not data
        try:
            digest = (file_sha256(path) if path.is_file() else
                      stable_hash([file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()]))
        except OSError as e:  # e.g. no read permission: an unreadable file, named
            if not config.skip_bad_files:
                raise readers.UnreadableFile(path, f"cannot read ({e.strerror or e})") from e
            digest = None
        out.append({"path": str(path), "sha256": digest})
    if not out and tools is not None:
        raise ValueError(f"--input {' '.join(map(str, config.inputs))}: no input file besides the --tools file "
                         f"{config.tools}, which is read as tools, not as records")
    return out + [{"path": s["path"], "sha256": None, "skipped": s["reason"]} for s in listing.skipped
                  if s["reason"] not in _NOT_IN_KEY]


_NOT_IN_KEY = (readers.HIDDEN, readers.CURATE_OUTPUT, readers.CURATE_WORK)


def _tools_path(config: IngestConfig) -> Path | None:
    return Path(config.tools).resolve() if config.tools is not None else None


def not_read(config: IngestConfig) -> list[dict]:
    """What the inputs hold and ingest does not read, each {"path", "reason", "records_read": 0}: what
    `readers.scan_inputs` skipped (DatasetDict splits not chosen, files of another type, hidden files,
    curate's own outputs, folders it cannot list with --skip-bad-files), and the --tools file; listed
    afresh from the folders."""
    listing = readers.scan_inputs(config.inputs, config.split, config.skip_bad_files)
    tools = _tools_path(config)
    out = list(listing.skipped)
    out += [{"path": str(p), "reason": "the --tools file: read as function schemas, not as records",
             "records_read": 0} for p in listing.units if tools is not None and p.resolve() == tools]
    return out


def ingest(config: IngestConfig, write_shard: Callable[[int, pa.Table], None],
           quarantine: Callable[[dict], None] | None = None, files: list[dict] | None = None) -> IngestResult:
    """Stream every input record; call write_shard(i, table) for each full shard as it fills.

    Bad records go to `quarantine(row)` as they are found (default: kept in `IngestResult.quarantine`),
    so a corpus with millions of bad records still runs in bounded memory. `files`: the inputs'
    `input_fingerprint`, if the caller has it already."""
    files = files if files is not None else input_fingerprint(config)
    res = IngestResult(files=[f for f in files if "skipped" not in f], skipped=not_read(config))
    # By now the process holds millions of long-lived objects (torch, transformers); every full garbage
    # collection that ingest's per-record dicts trigger would rescan them all. Frozen, they are skipped:
    # about 25% faster ingest. Records hold no reference cycles, so nothing is missed meanwhile.
    gc.freeze()
    try:
        units = [Path(f["path"]) for f in res.files]  # listed once, by the fingerprint
        n = helper_count(config, units)
        with HelperPool(n, config.format, config.default_tools()) if n else nullcontext() as pool:
            return _ingest(config, units, write_shard, quarantine, res, pool)
    finally:
        gc.unfreeze()


def helper_count(config: IngestConfig, units: list[Path]) -> int:
    """Helper processes for parsing JSON lines: --parse-procs when given (a negative one as 0), else one
    per usable CPU when there are two or more and the JSON-lines units hold HELPERS_MIN_BYTES (12 MiB)
    or more, else 0."""
    if config.parse_procs is not None:
        return max(0, config.parse_procs)
    jsonl = sum(p.stat().st_size for p in units if readers.is_json_lines(p))
    return usable_cpus() if usable_cpus() > 1 and jsonl >= HELPERS_MIN_BYTES else 0


class _Shards:
    """Rows in (a table and which of its rows to keep), shards of exactly `size` kept rows out (the
    last one shorter), numbered in order. Each shard is one `take` from the tables it spans: one copy,
    one record batch, whatever chunks its rows came from."""

    def __init__(self, size: int, write: Callable[[int, pa.Table], None]):
        self.size, self.write, self.count = size, write, 0
        self.pending: list[pa.Table] = []
        self.rows = 0              # rows in `pending`
        self.kept: list[int] = []  # indices of the kept ones, into their concatenation

    def add(self, table: pa.Table, keep: list[bool]) -> None:
        """Take one chunk's table and its keep flags (one per row); writes every shard that fills."""
        self.kept += [self.rows + i for i, k in enumerate(keep) if k]
        self.pending.append(table)
        self.rows += table.num_rows
        if len(self.kept) >= self.size:
            self._emit(final=False)

    def finish(self) -> int:
        """Write the last, shorter shard if kept rows are left; the number of shards written."""
        if self.kept:
            self._emit(final=True)
        return self.count

    def _emit(self, final: bool) -> None:
        table, done = pa.concat_tables(self.pending), 0
        while len(self.kept) - done >= (1 if final else self.size):
            self.write(self.count, table.take(self.kept[done:done + self.size]))
            self.count, done = self.count + 1, min(done + self.size, len(self.kept))
        first = self.kept[done] if done < len(self.kept) else table.num_rows  # keep what is not written
        self.pending = [table.slice(first)] if first < table.num_rows else []
        self.kept = [i - first for i in self.kept[done:]]
        self.rows = table.num_rows - first


def _ingest(config: IngestConfig, units: list[Path], write_shard: Callable[[int, pa.Table], None],
            quarantine: Callable[[dict], None] | None, res: IngestResult, pool: HelperPool | None) -> IngestResult:
    sink = quarantine or res.quarantine.append
    seen: set[str] = set()
    shards = _Shards(config.shard_size, write_shard)
    tools = config.default_tools()
    for result in _chunk_results(config, units, res.skipped, pool, tools):
        records, bad, limited = result.records, result.bad, False
        ids = records.column("id").to_pylist()
        if config.limit is None:
            keep = [rid not in seen and not seen.add(rid) for rid in ids]  # first occurrences (add: None)
        else:
            keep = []
            for rid in ids:
                keep.append(rid not in seen)
                seen.add(rid)
                if limited := len(seen) >= config.limit:
                    break
        if limited:  # --limit reads no further than its last record, so the counts still reconcile
            records = records.slice(0, len(keep))
            last = records.column("source_index")[-1].as_py()
            bad = [row for row in bad if row["source_index"] < last]
        for row in bad:
            sink(row)
        res.counts["input"] += records.num_rows + len(bad)
        res.counts["quarantined"] += len(bad)
        res.counts["duplicates"] += records.num_rows - sum(keep)
        for row, found in result.notes.items():
            if row < len(keep) and keep[row]:
                for note in set(found):  # once per record, however many of its messages have it
                    res.notes[note] = res.notes.get(note, 0) + 1
        shards.add(records, keep)
        if limited:
            break
    res.counts["shards"] = shards.finish()
    res.counts["skipped_files"] = len(res.skipped)
    return res


def _chunk_results(config: IngestConfig, units: list[Path], skipped: list[dict],
                   pool: HelperPool | None, tools: str | None) -> Iterator[chunks.ChunkResult]:
    """Every readable file's records, chunk by chunk, in input order."""
    for path in units:
        n = 0
        try:
            for result in _file_chunks(path, config.format, pool, tools):
                n += result.n_items
                yield result
        except readers.UnreadableFile as e:
            if not config.skip_bad_files:
                raise
            skipped.append({"path": str(path), "reason": e.why, "records_read": n})


def _file_chunks(path: Path, fmt: str, pool: HelperPool | None, tools: str | None) -> Iterator[chunks.ChunkResult]:
    source = str(path)
    if not readers.is_json_lines(path):
        for items in chunks.item_chunks(readers.read_records(path), fmt):
            yield chunks.normalize_items(source, items, fmt, tools)
        return
    lines = readers.read_json_line_chunks(path, chunks.CHUNK_BYTES, chunks.continues(fmt))
    if pool is not None:
        yield from pool.map(source, lines)
    else:
        for start, data in lines:
            yield chunks.normalize_lines(source, start, data, fmt, tools)

