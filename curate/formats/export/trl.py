"""TRL: Arrow IPC stream files that `datasets.load_dataset("arrow", ...)` reads and TRL trainers take as is.

- sft.arrow: conversational language modeling (`messages`) for `SFTTrainer`; extra columns kept.
- rl.arrow: prompt-only (`prompt` message list) for `GRPOTrainer`; every other column (`ground_truth`,
  `reward`, scores, ...) reaches reward functions as a keyword argument.
- pairs.arrow: conversational preference with explicit prompt (`prompt`, `chosen`, `rejected`) for
  `DPOTrainer`, with `ref_chosen_logps` / `ref_rejected_logps` when `curate irft` computed them.

Tool conversations: messages keep `tool_calls` (each call's `arguments` the JSON text), `tool` turns
keep `tool_call_id` / `name`, assistant turns `reasoning_content`, and the `tools` column (JSON text of
the function schemas, null without) stays on every file: `SFTTrainer` and `DPOTrainer` parse it per
example and hand it to the chat template with the conversation."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curate.formats.export import common

KIND = EXT = "arrow"
PARTITIONS = ("sft", "rl", "pairs")
UNSUPPORTED: dict[str, str] = {}


def convert(partition: str, table: pa.Table, path: Path, offset: int, part: common.Partition,
            log: common.RowLog) -> pa.Table:
    return common.partition_table(partition, table, path)
