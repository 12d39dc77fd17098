"""Reading a routed folder partition by partition: its shard files, one scan of a partition's shards
(`Partition`: the unified schema, the columns filled, the rows every target skips), then the shards
one at a time cast to that schema, each `screen`ed of those rows before a target converts it.

Separate from skips.py (the row checks the scan runs) and conventions.py (the row conventions), which it
applies, and from common.py (the writers): this is where input shards are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from curate.formats.export.conventions import MESSAGE_COLUMNS, _message_struct
from curate.formats.export.skips import RECORD_KEYS, RowLog, row_problems
from curate.io.atomic import read_arrow
from curate.messages import OPTIONAL_FIELDS

PARTITIONS = ("sft", "rl", "pairs")


def shard_files(routed: Path, partition: str) -> list[Path]:
    return sorted((routed / partition).glob("*.arrow"))


def partition_schema(files: list[Path]) -> pa.Schema:
    """One schema for all shards of a partition: a column that is all-null in one shard (say `reward`)
    and float in another must come out as one type, or a multi-shard file could not be written."""
    schemas = []
    for f in files:
        with pa.OSFile(str(f), "rb") as src:
            schemas.append(pa.ipc.open_stream(src).schema)
    return pa.unify_schemas(schemas, promote_options="permissive")


@dataclass(frozen=True)
class Partition:
    """One partition as a scan of all its shards found it, before any row is converted.

    schema: what every shard is cast to: types unified across shards, and message columns without the
    optional fields that no message of that column has in any row written. filled: the columns with at
    least one non-null value in some row written (say `tools`). skips: for each shard with rows that
    every target skips, the reason of each of its rows (None for a row kept), in row order."""

    name: str
    files: tuple[Path, ...]
    schema: pa.Schema
    filled: frozenset[str]
    skips: dict[Path, tuple[str | None, ...]]

    def has(self, column: str) -> bool:
        return column in self.filled

    def has_message_field(self, name: str) -> bool:
        """Whether some message column of the partition carries optional field `name` (say `tool_calls`)."""
        return any(name in struct.names for f in self.schema if f.name in MESSAGE_COLUMNS
                   for struct in [_message_struct(f.type)] if struct is not None)


def scan_partition(name: str, files: list[Path]) -> Partition:
    """Reads every shard once (one in memory at a time) for the rows every target skips, and the
    partition's schema and filled columns over the others."""
    unified = partition_schema(files)
    filled: set[str] = set()
    used: set[tuple[str, str]] = set()          # (message column, optional field) with a value somewhere
    skips: dict[Path, tuple[str | None, ...]] = {}
    for f in files:
        table = read_arrow(f)
        reasons = row_problems(name, table, f)
        if any(reasons):
            skips[f] = reasons
            table = table.filter(pa.array([r is None for r in reasons], pa.bool_()))
        for col in table.column_names:
            chunked = table.column(col)
            if chunked.null_count < len(chunked):
                filled.add(col)
            if col not in MESSAGE_COLUMNS or _message_struct(chunked.type) is None:
                continue
            for chunk in chunked.chunks:
                messages = chunk.flatten()                  # the struct of every message in the chunk
                for field, values in zip(messages.type, messages.flatten()):
                    if field.name in OPTIONAL_FIELDS and values.null_count < len(values):
                        used.add((col, field.name))
    fields = []
    for field in unified:
        struct = _message_struct(field.type) if field.name in MESSAGE_COLUMNS else None
        if struct is not None:
            kept = [m for m in struct if m.name not in OPTIONAL_FIELDS or (field.name, m.name) in used]
            field = field.with_type(pa.list_(pa.struct(kept)))
        fields.append(field)
    return Partition(name, tuple(files), pa.schema(fields, metadata=unified.metadata), frozenset(filled), skips)


def read_shards(part: Partition) -> Iterator[tuple[Path, pa.Table]]:
    """Shards in file order, cast to the partition's scanned schema (one shard in memory at a time)."""
    schema = part.schema
    for f in part.files:
        table = read_arrow(f)
        yield f, table.select(schema.names).cast(schema) if table.schema != schema else table


def screen(table: pa.Table, path: Path, part: Partition, log: RowLog) -> pa.Table:
    """A shard (as `read_shards` gives it) without the rows the scan found every target skips, each
    logged; `table` itself when it has none, so clean data gives the files it always did."""
    reasons = part.skips.get(path)
    if reasons is None:
        return table
    skipped = [i for i, r in enumerate(reasons) if r]
    keys = [c for c in RECORD_KEYS if c in table.column_names]
    for i, row in zip(skipped, table.select(keys).take(skipped).to_pylist()):
        log.skip(path, row, reasons[i])
    return table.filter(pa.array([r is None for r in reasons], pa.bool_()))
