"""LLaMA-Factory: ShareGPT JSON-lines files and a `dataset_info.json` registering them.

ShareGPT in LLaMA-Factory is strict: after an optional system turn, turns alternate human|observation
then gpt|function_call, an SFT conversation has an even number of turns (ends with gpt or
function_call), and a pairwise one an odd number (ends with human or observation) plus single `chosen`
/ `rejected` messages. Broken rows are silently skipped by LLaMA-Factory, so we write only rows that
satisfy this: consecutive turns on the same side (say a user message then a tool result, or two
parallel tool results) are joined with a blank line under the first one's tag, and leading system
turns become the `system` column.

Tool conversations (LLaMA-Factory's `function_call` / `observation` tags and `tools` column):
- an assistant turn with tool calls is a `function_call` turn whose value is the JSON text of
  `{"name", "arguments"}` (`arguments` the JSON object itself), a JSON list of them for several calls;
- its text, if any, goes before the calls as `TEXT<tool_call>JSON</tool_call>`, the form LLaMA-Factory
  >= 0.9.4 renders as the text followed by the formatted calls;
- `reasoning_content` goes in front of the turn's value as `<think>\\nREASONING\\n</think>\\n\\n`
  (LLaMA-Factory's default thought words), in gpt and function_call turns alike;
- `tool` turns are `observation`s; call ids and a tool turn's `name` have no ShareGPT field and are not
  written;
- `tools` (the JSON text of the function schemas in OpenAI's form, which every LLaMA-Factory tool
  format reads) is registered as the `tools` column.
A row that cannot be written this way (an assistant text right after its own calls with no tool result
between them, or text that contains `<tool_call>`) stops the export with an error naming the record.

- sft.jsonl (`curate_sft`): the conversation up to its last assistant turn.
- rl.jsonl (`curate_rl`): the prompt and the first reply of the demonstration (LLaMA-Factory's PPO
  stage generates from the prompt; the reply keeps the row valid ShareGPT).
- pairs.jsonl (`curate_pairs`, ranking): prompt turns plus `chosen` / `rejected`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from curate.formats.export import common
from curate.io.atomic import write_json
from curate.messages import call_arguments

KIND = EXT = "jsonl"
PARTITIONS = ("sft", "rl", "pairs")
UNSUPPORTED: dict[str, str] = {}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "system_tag": "system"}
FUNCTION_TAG = "function_call"        # written into `tags` for files with tool data (LLaMA-Factory's default)
ROLE_TAG = {"user": "human", "tool": "observation", "assistant": "gpt"}
THOUGHT = ("<think>\n", "\n</think>\n\n")      # LLaMA-Factory's default `thought_words`
TOOL_CALL = ("<tool_call>", "</tool_call>")    # LLaMA-Factory's default `tool_call_words` (>= 0.9.4)
DATASET = "curate_{}"


def function_call_value(calls: list[dict]) -> str:
    """A function_call turn's JSON: `{"name", "arguments"}` for one call, a list of them for several."""
    objs = [{"name": c["function"]["name"], "arguments": call_arguments(c["function"]["arguments"])} for c in calls]
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


def assistant_turn(run: list[dict], path: Path, row: dict) -> dict:
    """One gpt or function_call turn for consecutive assistant messages."""
    texts, calls, thoughts = [], [], []
    for m in run:
        if calls and m["content"]:
            raise common.row_error(path, row, "an assistant text right after that turn's tool calls, with no tool "
                                              "result between, has no ShareGPT form in LLaMA-Factory")
        if m["content"] or not m.get("tool_calls"):
            texts.append(m["content"])
        calls += m.get("tool_calls") or []
        if m.get("reasoning_content") is not None:
            thoughts.append(m["reasoning_content"])
    text = "\n\n".join(texts)
    if thoughts:
        text = THOUGHT[0] + "\n\n".join(thoughts) + THOUGHT[1] + text
    if not calls:
        return {"from": "gpt", "value": text}
    value = function_call_value(calls)
    if not text:
        return {"from": FUNCTION_TAG, "value": value}
    if TOOL_CALL[0] in text or TOOL_CALL[1] in text or TOOL_CALL[1] in value:
        raise common.row_error(path, row, f"an assistant turn with tool calls whose text or arguments contain "
                                          f"{TOOL_CALL[0]!r} or {TOOL_CALL[1]!r} has no unambiguous ShareGPT form")
    return {"from": FUNCTION_TAG, "value": f"{text}{TOOL_CALL[0]}{value}{TOOL_CALL[1]}"}


def sharegpt(messages: list[dict], path: Path, row: dict) -> tuple[str, list[dict]]:
    """(system text, alternating turns) of a message list."""
    system, i = [], 0
    while i < len(messages) and messages[i]["role"] == "system":
        system.append(messages[i]["content"])
        i += 1
    runs: list[tuple[bool, list[dict]]] = []          # (assistant side, consecutive messages)
    for m in messages[i:]:
        if m["role"] not in ROLE_TAG:
            raise common.row_error(path, row, f"a {m['role']!r} turn after the conversation started has no "
                                              "ShareGPT equivalent in LLaMA-Factory")
        side = m["role"] == "assistant"
        if runs and runs[-1][0] == side:
            runs[-1][1].append(m)
        else:
            runs.append((side, [m]))
    if not runs or runs[0][0]:
        raise common.row_error(path, row, "the conversation must start with a user turn for ShareGPT")
    turns = [assistant_turn(run, path, row) if side else
             {"from": ROLE_TAG[run[0]["role"]], "value": "\n\n".join(m["content"] for m in run)}
             for side, run in runs]
    return "\n\n".join(system), turns


def convert(partition: str, table: pa.Table, path: Path, offset: int, part: common.Partition) -> list[dict]:
    table = common.partition_table(partition, table, path)
    scalars = common.scalar_columns(table.schema)
    rows = []
    for row in table.to_pylist():
        out = {c: row[c] for c in scalars}
        if partition == "sft":
            out["system"], out["conversations"] = sharegpt(row["messages"], path, row)
        elif partition == "rl":
            first_reply = row["messages"][len(row["prompt"]):][:1] if row.get("messages") else []
            if not first_reply:
                raise common.row_error(path, row, "an rl row needs its demonstration's first reply")
            out["system"], out["conversations"] = sharegpt(row["prompt"] + first_reply, path, row)
        else:
            out["system"], out["conversations"] = sharegpt(row["prompt"], path, row)
            if out["conversations"][-1]["from"] in ("gpt", FUNCTION_TAG):
                raise common.row_error(path, row, "a pair's prompt must end with a user turn")
            for side in ("chosen", "rejected"):
                if len(row[side]) != 1:
                    raise common.row_error(path, row, f"LLaMA-Factory needs `{side}` to be one assistant "
                                                      f"message, got {len(row[side])}")
                out[side] = assistant_turn(row[side], path, row)
        rows.append(out)
    return rows


def finish(staging: Path, files: dict[str, str], parts: dict[str, common.Partition]) -> list[str]:
    """Writes dataset_info.json for the files written ({partition: file name}); returns its name."""
    info = {}
    for partition, name in sorted(files.items()):
        part = parts[partition]
        columns = {"messages": "conversations", "system": "system"}
        tags = dict(TAGS)
        if part.has("tools") or part.has_message_field("tool_calls"):
            tags["function_tag"] = FUNCTION_TAG
        if part.has("tools"):
            columns["tools"] = "tools"
        entry = {"file_name": name, "formatting": "sharegpt", "columns": columns, "tags": tags}
        if partition == "pairs":
            entry["ranking"] = True
            columns.update(chosen="chosen", rejected="rejected")
        info[DATASET.format(partition)] = entry
    write_json(staging / "dataset_info.json", info)
    return ["dataset_info.json"]
