"""What every export target shares: reading a routed folder shard by shard, the row conventions
(trimmed SFT conversations, one type for `ground_truth`, completions without their prompt) and
streaming writers that commit one file atomically however many shards go into it.

Messages leave curate in one of two forms. Arrow/Parquet files keep the message struct, without the
optional fields (`tool_calls`, `tool_call_id`, `name`, `reasoning_content`) that no message of the
column has anywhere in the partition: tool-free data keeps the `{role, content}` struct it always had,
tool data keeps its tool fields (null in the messages that have none). JSON-lines files write each
message compacted (`curate.messages.compact`: no null optional fields).

No row stops an export: a row that a target cannot represent is skipped and counted, by reason, in a
partition's `RowLog` (the manifest's `rows_skipped`), and a row written after a documented fold (say
LLaMA-Factory joining consecutive user turns) is counted by rule (`rows_folded`). Every target skips a
row that breaks the message contract of schemas/record.schema.json or that its partition's conventions
cannot hold (`row_problems`): the scan finds them, so the schema and filled columns come from the rows
written only, and `screen` takes them out of each shard before the target converts it. A target adds
its own reasons by raising `Skip` while it converts a row (LLaMA-Factory's ShareGPT).

The code lives in modules of its own, re-exported here (see `__all__`) for the targets and the tests:
conventions.py (row conventions and table conversions), skips.py (skip reasons, `Skip`, `RowLog`, the
row checks) and shards.py (shard files, the partition scan, reading and screening shards). This module
keeps the writer every target shares, `FileSink`."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.formats.export.conventions import (MESSAGE_COLUMNS, ability, json_messages, partition_table,
                                               rl_table, scalar_columns, sft_table, tool_names)
from curate.formats.export.shards import (PARTITIONS, Partition, read_shards, scan_partition, screen,
                                          shard_files)
from curate.formats.export.skips import (BAD_CALL, BAD_TOOLS, EMPTY_PROMPT, EXAMPLES, NO_ASSISTANT, NO_CONTENT,
                                         NULL_MESSAGE, PAIR_NOT_ASSISTANT, UNKNOWN_ROLE, RowLog, Skip)
from curate.io.atomic import atomic_path

__all__ = [
    "FileSink",
    # conventions.py
    "MESSAGE_COLUMNS", "ability", "json_messages", "partition_table", "rl_table", "scalar_columns",
    "sft_table", "tool_names",
    # shards.py
    "PARTITIONS", "Partition", "read_shards", "scan_partition", "screen", "shard_files",
    # skips.py
    "BAD_CALL", "BAD_TOOLS", "EMPTY_PROMPT", "EXAMPLES", "NO_ASSISTANT", "NO_CONTENT", "NULL_MESSAGE",
    "PAIR_NOT_ASSISTANT", "UNKNOWN_ROLE", "RowLog", "Skip",
]


class FileSink:
    """One output file written shard by shard into a temporary sibling, renamed on success.

    kind: "arrow" (IPC stream, what `datasets.load_dataset("arrow")` reads), "parquet" or "jsonl"
    (sorted keys, so the same rows always give the same bytes)."""

    def __init__(self, path: Path, kind: str, stack: ExitStack):
        self.path, self.kind, self.rows = path, kind, 0
        self._stack, self._writer, self.schema = stack, None, None
        self.columns: list[str] = []

    def _open(self, schema: pa.Schema | None) -> None:
        tmp, self.schema = self._stack.enter_context(atomic_path(self.path)), schema
        if self.kind == "arrow":
            sink = self._stack.enter_context(pa.OSFile(str(tmp), "wb"))
            self._writer = self._stack.enter_context(pa.ipc.new_stream(sink, schema))
        elif self.kind == "parquet":
            self._writer = self._stack.enter_context(pq.ParquetWriter(str(tmp), schema))
        else:
            self._writer = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))

    def write_table(self, table: pa.Table) -> None:
        if self._writer is None:
            self._open(table.schema)
            self.columns = table.column_names
        elif table.column_names != self.columns:
            raise ValueError(f"{self.path}: shards disagree on columns: {self.columns} vs {table.column_names}")
        self._writer.write_table(table if table.schema == self.schema else table.cast(self.schema))
        self.rows += table.num_rows

    def write_rows(self, rows: list[dict]) -> None:
        if self._writer is None:
            self._open(None)
        for row in rows:
            self.columns = sorted(set(self.columns) | set(row))
            self._writer.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        self.rows += len(rows)
