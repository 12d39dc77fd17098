"""LLaMA-Factory: ShareGPT JSON-lines files and a `dataset_info.json` registering them.

ShareGPT in LLaMA-Factory is strict: after an optional system turn, turns alternate human|observation
then gpt, an SFT conversation has an even number of turns (ends with gpt), and a pairwise one an odd
number (ends with human) plus single `chosen` / `rejected` gpt messages. Broken rows are silently
skipped by LLaMA-Factory, so we write only rows that satisfy this: consecutive turns on the same side
(say a user message then a tool result) are joined with a blank line, `tool` turns are
`observation`s, and leading system turns become the `system` column.

- sft.jsonl (`curate_sft`): the conversation up to its last assistant turn.
- rl.jsonl (`curate_rl`): the prompt and the first reply of the demonstration (LLaMA-Factory's PPO
  stage generates from the prompt; the reply keeps the row valid ShareGPT).
- pairs.jsonl (`curate_pairs`, ranking): prompt turns plus `chosen` / `rejected`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curate.formats.export import common
from curate.io.atomic import write_json

KIND = EXT = "jsonl"
PARTITIONS = ("sft", "rl", "pairs")
UNSUPPORTED: dict[str, str] = {}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "system_tag": "system"}
ROLE_TAG = {"user": "human", "tool": "observation", "assistant": "gpt"}
DATASET = "curate_{}"


def sharegpt(messages: list[dict], path: Path, row: dict) -> tuple[str, list[dict]]:
    """(system text, alternating turns) of a message list."""
    system, i = [], 0
    while i < len(messages) and messages[i]["role"] == "system":
        system.append(messages[i]["content"])
        i += 1
    turns: list[dict] = []
    for m in messages[i:]:
        if m["role"] not in ROLE_TAG:
            raise common.row_error(path, row, f"a {m['role']!r} turn after the conversation started has no "
                                              "ShareGPT equivalent in LLaMA-Factory")
        tag = ROLE_TAG[m["role"]]
        if turns and (tag == "gpt") == (turns[-1]["from"] == "gpt"):
            turns[-1]["value"] += "\n\n" + m["content"]
        else:
            turns.append({"from": tag, "value": m["content"]})
    if not turns or turns[0]["from"] == "gpt":
        raise common.row_error(path, row, "the conversation must start with a user turn for ShareGPT")
    return "\n\n".join(system), turns


def convert(partition: str, table: pa.Table, path: Path, offset: int) -> list[dict]:
    table = common.partition_table(partition, table, path)
    rows = []
    for row in table.to_pylist():
        out = {c: row[c] for c in common.scalar_columns(table.schema)}
        if partition == "sft":
            out["system"], out["conversations"] = sharegpt(row["messages"], path, row)
        elif partition == "rl":
            first_reply = row["messages"][len(row["prompt"]):][:1] if row.get("messages") else []
            if not first_reply:
                raise common.row_error(path, row, "an rl row needs its demonstration's first reply")
            out["system"], out["conversations"] = sharegpt(row["prompt"] + first_reply, path, row)
        else:
            out["system"], out["conversations"] = sharegpt(row["prompt"], path, row)
            if out["conversations"][-1]["from"] == "gpt":
                raise common.row_error(path, row, "a pair's prompt must end with a user turn")
            for side in ("chosen", "rejected"):
                if len(row[side]) != 1:
                    raise common.row_error(path, row, f"LLaMA-Factory needs `{side}` to be one assistant "
                                                      f"message, got {len(row[side])}")
                out[side] = {"from": "gpt", "value": row[side][0]["content"]}
        rows.append(out)
    return rows


def finish(staging: Path, files: dict[str, str]) -> list[str]:
    """Writes dataset_info.json for the files written ({partition: file name}); returns its name."""
    info = {}
    for partition, name in sorted(files.items()):
        columns = {"messages": "conversations", "system": "system"}
        entry = {"file_name": name, "formatting": "sharegpt", "columns": columns, "tags": dict(TAGS)}
        if partition == "pairs":
            entry["ranking"] = True
            columns.update(chosen="chosen", rejected="rejected")
        info[DATASET.format(partition)] = entry
    write_json(staging / "dataset_info.json", info)
    return ["dataset_info.json"]
