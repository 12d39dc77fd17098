"""verl: parquet files in the layout of verl's RLHFDataset (RL) and MultiTurnSFTDataset (SFT).

rl.parquet rows: `data_source` ("curate/<input format>", what a custom reward function dispatches on),
`prompt` (chat list), `ability`, `reward_model` {style: "rule", ground_truth: string, "" when absent},
`extra_info` {index, split, id, provenance, scores, reward, Prefix-RFT token annotations} and, when the
prefix stage ran, `demos` (list of strings) and `demos_corr` (list of bools) as Prefix-RFT's
PrefixRFTDataset reads them. sft.parquet rows: `messages` (ending with an assistant turn) and the
scalar columns.

Tool conversations: `prompt` / `messages` keep their tool fields (see conventions.py); rl rows carry
`extra_info.tools` (the JSON text of the row's function schemas, null without) and
`extra_info.tool_selection` (their names, null without: verl's ToolAgentLoop offers a row only these
of the tools in its tool config); sft rows keep the `tools` column (JSON text) when some row of the
partition has tools, and have none otherwise (verl's MultiTurnSFTDataset passes the column's value to the
chat template, which a null breaks)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curate.formats.export import common

KIND = EXT = "parquet"
PARTITIONS = ("sft", "rl")
UNSUPPORTED = {"pairs": "verl has no preference-pair (DPO) trainer; export pairs with --to trl or openrlhf"}
# Columns of a routed RL row copied into extra_info when present (reward functions receive extra_info).
EXTRA_INFO = ("id", "source", "source_index", "format", "reward", "score", "gini", "cv", "kurtosis",
              "probe_loss", "grad_norm_total", "route", "threshold", "route_confidence", "rm_score", "demo_len_tokens", "cut_points",
              "tools")


def convert(partition: str, table: pa.Table, path: Path, offset: int, part: common.Partition,
            log: common.RowLog) -> pa.Table:
    if partition == "sft":
        table = common.sft_table(table, path)
        # MultiTurnSFTDataset hands a `tools` column's value to the chat template as the tool list: a
        # partition without any tools leaves the column out (a null there fails the template)
        keep = [c for c in common.scalar_columns(table.schema) if c != "messages" and (c != "tools" or part.has("tools"))]
        return table.select(["messages", *keep])
    return rl_table(common.rl_table(table, path), offset)


def rl_table(table: pa.Table, offset: int) -> pa.Table:
    names = table.column_names
    extra_cols = [c for c in EXTRA_INFO if c in names]
    # verl's ToolAgentLoop (0.9) offers a row only the tools its extra_info.tool_selection names
    selection = [("tool_selection", pa.list_(pa.string()))] if "tools" in names else []
    extra_type = pa.struct([("index", pa.int64()), ("split", pa.string()),
                            *[(c, table.schema.field(c).type) for c in extra_cols], *selection])
    fmts = table.column("format").to_pylist() if "format" in names else [None] * len(table)
    truths = table.column("ground_truth").to_pylist()
    extras = table.select(extra_cols).to_pylist()
    for i, extra in enumerate(extras):
        extra.update(index=offset + i, split="train")
        if selection:
            extra["tool_selection"] = common.tool_names(extra["tools"])
    cols = {
        "data_source": pa.array([f"curate/{f or 'unknown'}" for f in fmts], pa.string()),
        "prompt": table.column("prompt"),
        "ability": pa.array([common.ability(f, t) for f, t in zip(fmts, truths)], pa.string()),
        "reward_model": pa.array([{"style": "rule", "ground_truth": t} for t in truths],
                                 pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        "extra_info": pa.array(extras, extra_type),
    }
    if "demo" in names:
        # A demonstration is "correct" unless the input recorded a failing outcome (reward <= 0).
        rewards = table.column("reward").to_pylist() if "reward" in names else [None] * len(table)
        demos = table.column("demo").to_pylist()
        cols["demos"] = pa.array([[d] if d else [] for d in demos], pa.list_(pa.string()))
        cols["demos_corr"] = pa.array([[r is None or r > 0] if d else [] for d, r in zip(demos, rewards)],
                                      pa.list_(pa.bool_()))
    return pa.table(cols)
