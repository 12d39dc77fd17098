"""The row conventions every target writes, and the table conversions built on them: SFT conversations
trimmed to their last assistant turn, one type (string) for `ground_truth`, completions without their
prompt, and the small column helpers the targets share (scalar columns, JSON-lines messages, tool names).

Separate from the rest of the export code because it is its base layer: functions of rows and Arrow
tables only, with no files, scans or skip counts; skips.py (each partition's rules) and shards.py (the
scan) build on it, and common.py re-exports what the targets use."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from curate.messages import compact_all

# Columns holding message lists; everything else that is not a list is a "scalar" column.
MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "train_context")
AGENT_FORMATS = ("transcript", "actions", "webshop_session")


def _message_struct(type_: pa.DataType) -> pa.StructType | None:
    if pa.types.is_list(type_) and pa.types.is_struct(type_.value_type):
        return type_.value_type
    return None


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
