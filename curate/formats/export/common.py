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
its own reasons by raising `Skip` while it converts a row (LLaMA-Factory's ShareGPT)."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.atomic import atomic_path, read_arrow
from curate.messages import OPTIONAL_FIELDS, compact_all

PARTITIONS = ("sft", "rl", "pairs")
# Columns holding message lists; everything else that is not a list is a "scalar" column.
MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "train_context")
AGENT_FORMATS = ("transcript", "actions", "webshop_session")
ROLES = ("system", "user", "assistant", "tool")            # schemas/record.schema.json
RECORD_KEYS = ("id", "source", "source_index")             # what names a skipped row in the manifest
EXAMPLES = 5                                                # records named per partition and reason

# Reasons every target skips a row for (the keys of the manifest's rows_skipped counts).
NULL_MESSAGE = "a message is null"
UNKNOWN_ROLE = "a message's role is not system, user, assistant or tool"
NO_CONTENT = "a message's content is not a string"
BAD_CALL = "a tool call has no function name or its arguments are not text"
BAD_TOOLS = "`tools` is not the JSON text of a list of function schemas"
NO_ASSISTANT = "no assistant turn to train on"
EMPTY_PROMPT = "the prompt is empty"
PAIR_NOT_ASSISTANT = "`{}` does not end with an assistant turn"      # .format("chosen" | "rejected")


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


def _message_struct(type_: pa.DataType) -> pa.StructType | None:
    if pa.types.is_list(type_) and pa.types.is_struct(type_.value_type):
        return type_.value_type
    return None


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


class Skip(Exception):
    """Raised while converting a row that the target cannot represent: the row is skipped and counted
    under `reason` (a short fixed sentence, the same for every such row)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RowLog:
    """One partition's rows besides those written as they are: skipped (count per reason, and the first
    EXAMPLES records of each reason named by shard, id and input row) and folded (count per rule: rows
    written after a documented rewrite). rows_in = rows written + sum(skipped.values())."""

    def __init__(self, partition: str):
        self.partition, self.rows_in = partition, 0
        self.skipped: Counter[str] = Counter()
        self.folded: Counter[str] = Counter()
        self.folded_rows = 0
        self.examples: list[dict] = []
        self.notes: set[str] = set()        # what a target notes of the rows it wrote (LLaMA-Factory: tool use)

    def skip(self, path: Path, row: dict, reason: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= EXAMPLES:
            self.examples.append({"reason": reason, "shard": f"{self.partition}/{path.name}",
                                  **{k: row.get(k) for k in RECORD_KEYS}})

    def fold(self, rules: set[str]) -> None:
        """A written row, after the fold rules `rules` (none: written as it is)."""
        self.folded.update(rules)
        self.folded_rows += bool(rules)


def message_problem(messages: list[dict] | None) -> str | None:
    """Why a message list breaks the canonical message contract (schemas/record.schema.json), or None.
    A null list is not checked here (a column the row does not use)."""
    for m in messages or ():
        if m is None:
            return NULL_MESSAGE
        if m.get("role") not in ROLES:
            return UNKNOWN_ROLE
        if not isinstance(m.get("content"), str):
            return NO_CONTENT
        for c in m.get("tool_calls") or ():
            fn = c.get("function") if isinstance(c, dict) else None
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
                    and isinstance(fn.get("arguments"), str)):
                return BAD_CALL
    return None


@lru_cache(maxsize=1024)                # rows of one source usually share one `tools` text
def tools_problem(tools: str | None) -> str | None:
    """Why a `tools` value (text or null) is not the JSON text of a list of function schemas each with a
    name, or None."""
    if tools is None:
        return None
    try:
        parsed = json.loads(tools)
    except ValueError:
        return BAD_TOOLS
    if not isinstance(parsed, list):
        return BAD_TOOLS
    for t in parsed:
        fn = (t.get("function") or t) if isinstance(t, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            return BAD_TOOLS
    return None


def contract_problem(row: dict) -> str | None:
    """The first contract break of a row's message columns and `tools`, or None."""
    for col in MESSAGE_COLUMNS:
        if col in row and (reason := message_problem(row[col])):
            return reason
    tools = row.get("tools")
    return tools_problem(tools) if tools is None or isinstance(tools, str) else BAD_TOOLS


def _sft_problem(row: dict) -> str | None:
    return None if trim_to_last_assistant(row["messages"] or []) else NO_ASSISTANT


def _rl_problem(row: dict) -> str | None:
    return None if row["prompt"] else EMPTY_PROMPT


def _pair_problem(row: dict) -> str | None:
    for side in ("chosen", "rejected"):
        msgs = completion(row["prompt"] or [], row[side] or [])
        if not msgs or msgs[-1]["role"] != "assistant":
            return PAIR_NOT_ASSISTANT.format(side)
    return None


# partition: (columns a shard must have, why one of its rows cannot follow the partition's conventions)
PARTITION_RULES = {"sft": (("messages",), _sft_problem), "rl": (("prompt",), _rl_problem),
                   "pairs": (("prompt", "chosen", "rejected"), _pair_problem)}


def row_problems(partition: str, table: pa.Table, path: Path) -> tuple[str | None, ...]:
    """Why each row of a shard is skipped by every target (None for a row kept): a break of the message
    contract, else a row its partition's conventions cannot hold (an SFT row with no assistant turn, an
    RL row with no prompt, a pair side that does not end with a reply). A shard without the partition's
    columns is an error."""
    required, problem = PARTITION_RULES[partition]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: a {partition} shard needs columns {', '.join(required)}; missing {missing}")
    lists = [c for c in MESSAGE_COLUMNS if c in table.column_names and _message_list(table.schema.field(c).type)]
    if not_lists := [c for c in required if c not in lists]:
        raise ValueError(f"{path}: column {', '.join(not_lists)} must hold message lists (list<struct>), not "
                         f"{', '.join(str(table.schema.field(c).type) for c in not_lists)}")
    cols = lists + ["tools"] * ("tools" in table.column_names)
    return tuple(contract_problem(row) or problem(row) for row in table.select(cols).to_pylist())


def _message_list(type_: pa.DataType) -> bool:
    """A message column as Arrow holds it: a list of structs, or all-null (a shard whose rows have none)."""
    return pa.types.is_null(type_) or _message_struct(type_) is not None


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


def trim_to_last_assistant(messages: list[dict]) -> list[dict]:
    """SFT trains on assistant turns: a transcript that ends with an observation or a user turn loses
    that tail (nothing after the last reply is learned from, and some trainers reject it)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return list(messages[:last + 1])


def ground_truth(value: str | None) -> str:
    """`ground_truth` is always a string across rows ("" when the input had none, e.g. agent data):
    verl and TRL collate columns per batch, and a column mixing null and strings breaks some of them."""
    return "" if value is None else str(value)


def completion(prompt: list[dict], messages: list[dict]) -> list[dict]:
    """`chosen`/`rejected` without the prompt when they repeat it (TRL's explicit-prompt form). Compared
    compacted: the two columns may carry different optional fields, null where a message has none."""
    n = len(prompt)
    same = n and compact_all(messages[:n]) == compact_all(prompt)
    return list(messages[n:]) if same else list(messages)


def ability(fmt: str | None, truth: str) -> str:
    return "agent" if fmt in AGENT_FORMATS else "verifiable" if truth else "chat"


def scalar_columns(schema: pa.Schema) -> list[str]:
    """Columns that are not lists or structs: ids, provenance, scores, weights, `tools` (JSON text)."""
    return [f.name for f in schema if not pa.types.is_nested(f.type)]


def json_messages(row: dict) -> dict:
    """A row (from `to_pylist`) with each of its message columns compacted, for JSON-lines files."""
    for col in MESSAGE_COLUMNS:
        if isinstance(row.get(col), list):
            row[col] = compact_all(row[col])
    return row


def tool_names(tools: str | None) -> list[str] | None:
    """Names of the functions in a `tools` value (canonical JSON text), in order; None when it is null."""
    if tools is None:
        return None
    return [(t.get("function") or t)["name"] for t in json.loads(tools)]


def with_column(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    array = pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


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


# --- table conversions shared by the columnar targets (TRL arrow, verl parquet) ---

# SFT rows drop these: TRL's SFTTrainer reads a `prompt` column as the prompt-completion type (and then
# wants `completion`), so `messages` must be the only conversation it sees. `tools` stays: SFTTrainer
# passes it (JSON text, parsed per example) to the chat template with the conversation.
SFT_RESERVED = ("prompt", "completion", "text", "chat_template_kwargs")


def sft_table(table: pa.Table, path: Path) -> pa.Table:
    """Every other column kept; `messages` ends with its last assistant turn; `ground_truth` a string.
    (A row with no assistant turn never gets here: see `screen`.)"""
    table = table.drop_columns([c for c in SFT_RESERVED if c in table.column_names])
    trimmed = [trim_to_last_assistant(msgs or []) for msgs in table.column("messages").to_pylist()]
    table = with_column(table, "messages", trimmed, table.schema.field("messages").type)
    return normalize_ground_truth(table, add=False)


def rl_table(table: pa.Table, path: Path) -> pa.Table:
    """Prompt-only rows (`prompt` = messages before the first assistant turn) with every other column,
    and a string `ground_truth` on every row, so reward functions can always read it."""
    return normalize_ground_truth(table, add=True)


def pairs_table(table: pa.Table, path: Path) -> pa.Table:
    """`prompt` / `chosen` / `rejected` message lists, completions without the prompt (TRL's explicit
    prompt form), each ending with an assistant turn (`screen` took out the pairs where one does not);
    the other columns (reference log-probs, rewards, scores) are kept."""
    rows = table.select(["prompt", "chosen", "rejected"]).to_pylist()
    for side in ("chosen", "rejected"):
        values = [completion(row["prompt"] or [], row[side] or []) for row in rows]
        table = with_column(table, side, values, table.schema.field(side).type)
    return normalize_ground_truth(table, add=False)


def partition_table(partition: str, table: pa.Table, path: Path) -> pa.Table:
    """The row conventions of one partition (sft, rl or pairs)."""
    return {"sft": sft_table, "rl": rl_table, "pairs": pairs_table}[partition](table, path)


def normalize_ground_truth(table: pa.Table, add: bool) -> pa.Table:
    if "ground_truth" not in table.column_names and not add:
        return table
    values = table.column("ground_truth").to_pylist() if "ground_truth" in table.column_names else [None] * len(table)
    return with_column(table, "ground_truth", [ground_truth(v) for v in values], pa.string())
