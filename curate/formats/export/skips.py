"""Row skipping and folding bookkeeping: the reasons every target skips a row for, `Skip` (raised by a
target for its own reasons while it converts a row), `RowLog` (one partition's skipped and folded rows,
the manifest's `rows_skipped` / `rows_folded`) and `row_problems`, which finds the rows every target
skips (a break of the message contract of schemas/record.schema.json, or of a partition's conventions).

Separate from shards.py (reading and scanning shards) and common.py (writing files): this decides which
rows are written and counts the others, from row values alone."""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from curate.formats.export.conventions import (MESSAGE_COLUMNS, _message_struct, completion,
                                               trim_to_last_assistant)

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
