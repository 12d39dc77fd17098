"""OpenRLHF: JSON-lines files for its SFT, PPO/REINFORCE (prompt) and DPO datasets, all used with
`--apply_chat_template` (message lists, rendered by the model's own chat template).

- sft.jsonl: `messages` (whole conversation, ending with an assistant turn; `--multiturn` trains every
  assistant turn), and `input` (all but the last turn) / `output` (the last assistant turn) for
  `--input_key input --output_key output`.
- rl.jsonl: `input` (prompt messages), `label` (ground truth, "" when absent; what `--label_key label`
  hands a reward function) and `datasource` (read by OpenRLHF's PromptDataset).
- pairs.jsonl: `prompt`, `chosen`, `rejected` message lists (completions without the prompt).
Every row also carries the scalar columns (id, provenance, scores, reference log-probs, ...).

Messages are compacted: a message has `tool_calls` / `tool_call_id` / `name` / `reasoning_content` only
when it has a value for them (so `'tool_calls' in message` means what templates take it to mean).
`tools` (JSON text of the function schemas, null for a row without) is one of the scalar columns;
OpenRLHF 0.11 does not pass it to the chat template (see docs/exports.md)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curate.formats.export import common

KIND = EXT = "jsonl"
PARTITIONS = ("sft", "rl", "pairs")
UNSUPPORTED: dict[str, str] = {}


def convert(partition: str, table: pa.Table, path: Path, offset: int, part: common.Partition,
            log: common.RowLog) -> list[dict]:
    table = common.partition_table(partition, table, path)
    scalars = common.scalar_columns(table.schema)
    keep = ["messages"] if partition == "sft" else ["prompt"] if partition == "rl" else ["prompt", "chosen", "rejected"]
    rows = []
    for row in table.select([*keep, *scalars]).to_pylist():
        row = common.json_messages(row)
        if partition == "sft":
            row.update(input=row["messages"][:-1], output=row["messages"][-1:])
        elif partition == "rl":
            row.update(input=row.pop("prompt"), label=row["ground_truth"],
                       datasource=f"curate/{row.get('format') or 'unknown'}")
        rows.append(row)
    return rows
