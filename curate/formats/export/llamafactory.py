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
- a call's `arguments` are written as the JSON value their text holds; text that is not JSON is not
  written (LLaMA-Factory `json.dumps` the value, so it would train on the text quoted).

A row that has no such form is skipped and counted under its reason in the manifest (`rows_skipped`,
see docs/exports.md): a system turn after the conversation started, a conversation that does not start
with a user (or tool) turn, an assistant text right after its own calls with no tool result between,
a turn with calls whose text or arguments contain `<tool_call>` / `</tool_call>`, arguments that are not
JSON; an rl row whose prompt is not followed by an assistant reply; a pair whose prompt ends with an
assistant turn or whose `chosen` / `rejected` is not one assistant message. Rows written after a join
(several leading system turns, consecutive user/tool turns, consecutive assistant turns) are counted
per rule in `rows_folded`.

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


# Why a row is skipped (the keys of the manifest's rows_skipped counts) ...
MID_SYSTEM = "a system turn after the conversation started (ShareGPT has no place for it)"
NOT_USER_FIRST = "the conversation does not start with a user or tool turn"
TEXT_AFTER_CALLS = "an assistant text right after that turn's tool calls, with no tool result between"
CALL_MARKER = f"a turn with tool calls whose text or arguments contain {TOOL_CALL[0]} or {TOOL_CALL[1]}"
ARGS_NOT_JSON = "tool call arguments that are not JSON"
ARGS_SURROGATE = "tool call arguments with an unpaired surrogate escape (\\ud800-\\udfff), which UTF-8 cannot hold"
RL_NO_REPLY = "the prompt is not followed by an assistant reply"
PAIR_PROMPT_END = "a pair's prompt ends with an assistant turn"
PAIR_SIDE = "`{}` is not one assistant message"                 # .format("chosen" | "rejected")
# ... and the rules a written row may have been folded by (the keys of rows_folded).
JOIN_SYSTEM = "several leading system turns joined into `system`"
JOIN_USER = "consecutive user/tool turns joined into one human/observation turn"
JOIN_ASSISTANT = "consecutive assistant turns joined into one gpt/function_call turn"


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def arguments_value(text: str):
    """A call's arguments as the JSON value their text holds (an object for well-formed calls)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        raise common.Skip(ARGS_NOT_JSON) from None


def function_call_value(calls: list[dict]) -> str:
    """A function_call turn's JSON: `{"name", "arguments"}` for one call, a list of them for several."""
    objs = [{"name": c["function"]["name"], "arguments": arguments_value(c["function"]["arguments"])} for c in calls]
    value = json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)
    try:                                # parsed "\ud800" escapes are text no UTF-8 file can hold
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise common.Skip(ARGS_SURROGATE) from None
    return value


def assistant_turn(run: list[dict]) -> dict:
    """One gpt or function_call turn for consecutive assistant messages; raises Skip when there is none."""
    texts, calls, thoughts = [], [], []
    for m in run:
        if calls and m["content"]:
            raise common.Skip(TEXT_AFTER_CALLS)
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
        raise common.Skip(CALL_MARKER)
    return {"from": FUNCTION_TAG, "value": f"{text}{TOOL_CALL[0]}{value}{TOOL_CALL[1]}"}


def sharegpt(messages: list[dict] | None, folds: set[str]) -> tuple[str, list[dict]]:
    """(system text, alternating turns) of a message list; the join rules used are added to `folds`.
    Raises Skip for a list with no ShareGPT form."""
    messages, system, i = messages or [], [], 0
    while i < len(messages) and messages[i]["role"] == "system":
        system.append(messages[i]["content"])
        i += 1
    if len(system) > 1:
        folds.add(JOIN_SYSTEM)
    runs: list[tuple[bool, list[dict]]] = []          # (assistant side, consecutive messages)
    for m in messages[i:]:
        if m["role"] not in ROLE_TAG:
            raise common.Skip(MID_SYSTEM)
        side = m["role"] == "assistant"
        if runs and runs[-1][0] == side:
            runs[-1][1].append(m)
            folds.add(JOIN_ASSISTANT if side else JOIN_USER)
        else:
            runs.append((side, [m]))
    if not runs or runs[0][0]:
        raise common.Skip(NOT_USER_FIRST)
    turns = [assistant_turn(run) if side else
             {"from": ROLE_TAG[run[0]["role"]], "value": "\n\n".join(m["content"] for m in run)}
             for side, run in runs]
    return "\n\n".join(system), turns


def convert_row(partition: str, row: dict, scalars: list[str], folds: set[str]) -> dict:
    """One ShareGPT row; raises Skip for a row LLaMA-Factory's ShareGPT cannot hold."""
    out = {c: row[c] for c in scalars}
    if partition == "sft":
        out["system"], out["conversations"] = sharegpt(row["messages"], folds)
    elif partition == "rl":
        first_reply = (row.get("messages") or [])[len(row["prompt"]):][:1]
        if not first_reply or first_reply[0]["role"] != "assistant":
            raise common.Skip(RL_NO_REPLY)
        out["system"], out["conversations"] = sharegpt(row["prompt"] + first_reply, folds)
    else:
        out["system"], out["conversations"] = sharegpt(row["prompt"], folds)
        if out["conversations"][-1]["from"] in ("gpt", FUNCTION_TAG):
            raise common.Skip(PAIR_PROMPT_END)
        for side in ("chosen", "rejected"):
            if len(row[side]) != 1:
                raise common.Skip(PAIR_SIDE.format(side))
            out[side] = assistant_turn(row[side])
    return out


def convert(partition: str, table: pa.Table, path: Path, offset: int, part: common.Partition,
            log: common.RowLog) -> list[dict]:
    table = common.partition_table(partition, table, path)
    scalars = common.scalar_columns(table.schema)
    rows = []
    for row in table.to_pylist():
        folds: set[str] = set()
        try:
            rows.append(convert_row(partition, row, scalars, folds))
        except common.Skip as e:
            log.skip(path, row, e.reason)
            continue
        log.fold(folds)
        if row.get("tools") is not None:                  # what dataset_info.json registers (`finish`)
            log.notes.add("tools")
        if any(isinstance(m, dict) and m.get("tool_calls") is not None for col in common.MESSAGE_COLUMNS
               if isinstance(row.get(col), list) for m in row[col]):
            log.notes.add("tool_calls")
    return rows


def finish(staging: Path, files: dict[str, str], parts: dict[str, common.Partition],
           logs: dict[str, common.RowLog]) -> list[str]:
    """Writes dataset_info.json for the files written ({partition: file name}), registering `tools` and
    `function_tag` where the rows written use them; returns its name."""
    info = {}
    for partition, name in sorted(files.items()):
        used = logs[partition].notes
        columns = {"messages": "conversations", "system": "system"}
        tags = dict(TAGS)
        if "tools" in used or "tool_calls" in used:
            tags["function_tag"] = FUNCTION_TAG
        if "tools" in used:
            columns["tools"] = "tools"
        entry = {"file_name": name, "formatting": "sharegpt", "columns": columns, "tags": tags}
        if partition == "pairs":
            entry["ranking"] = True
            columns.update(chosen="chosen", rejected="rejected")
        info[DATASET.format(partition)] = entry
    write_json(staging / "dataset_info.json", info)
    return ["dataset_info.json"]
