"""Tool conversations exported to every target and read by the real consumers, with a tool-aware chat
template (TRL's copy of Qwen3-Instruct-2507's, which writes string arguments as they are) on the
SmolLM2 tokenizer:
- TRL: SFTTrainer renders each row with its `tools` and trains a step; GRPOTrainer hands `tools` to
  reward functions; DPOTrainer renders the prompt with the row's `tools`.
- verl: RLHFDataset reads `extra_info.tools` / `tool_selection`, with a tool config built from them.
- OpenRLHF: SFTDataset (--multiturn) and PromptDataset render the compacted messages.
- LLaMA-Factory: ShareGPT rules (function_call / observation slots) and its FunctionFormatter /
  ToolFormatter parsing, re-implemented here as the existing tests do (llamafactory is not installed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from curate import schema
from curate.formats.export import TARGETS, export
from curate.io.atomic import read_arrow, write_arrow
from curate.messages import compact_all, parse_tools
from tests.formats.test_export_tools import GLAIVE_TOOLS, PAIRS, PAIRS_SCHEMA, TAU_TOOLS, tool_rows
from tests.formats.test_exports import write_routed
from tests.integration.test_export_consumers import _check_sharegpt, _verl
from tests.integration.test_openrlhf_consumer import _openrlhf, _rows, _strategy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tool_exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool_export")
    folder = write_routed(root / "routed", tool_rows(), schema.arrow_schema(schema.ROUTED))
    for k, rows in enumerate([PAIRS[:1], PAIRS[1:]]):
        write_arrow(folder / "pairs" / f"part-{k:05d}.arrow", pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))
    return {to: (export(folder, to, root / to), root / to)[1] for to in TARGETS} | {"routed": folder}


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer with a tool-aware chat template (TRL ships Qwen3-Instruct-2507's)."""
    import trl
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates/qwen3_instruct_2507.jinja").read_text()
    return tok


def _routed(folder: Path, part: str) -> dict[str, dict]:
    return {r["id"]: r for f in sorted((folder / part).glob("*.arrow")) for r in read_arrow(f).to_pylist()}


def _arrow(path: Path) -> datasets.Dataset:
    return datasets.load_dataset("arrow", data_files=str(path), split="train")


def test_trl_sft_trainer_renders_tools_and_takes_a_step(tool_exports, tiny_model_dir, tool_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    ds = _arrow(tool_exports["trl"] / "sft.arrow")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, max_length=2048,
                     learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tool_tokenizer)
    for row, item in zip(ds, trainer.train_dataset):           # what SFTTrainer trains on, row by row
        want = tool_tokenizer.apply_chat_template(compact_all(row["messages"]), tools=parse_tools(row["tools"]),
                                                  tokenize=False)
        assert tool_tokenizer.decode(item["input_ids"]) == want
    tau, plain, glaive = (tool_tokenizer.decode(x["input_ids"]) for x in trainer.train_dataset)
    assert '"name": "search_direct_flight"' in tau.split("\n</tools>")[0]      # the schemas, from `tools`
    assert '"arguments": {"origin":"JFK","destination":"SFO","date":"2024-05-20"}}' in tau  # as the input had it
    assert "<tool_response>\n[]\n</tool_response>" in tau and "<tools>" not in plain
    assert '"name": "convert_currency", "arguments": {"amount": 100' in glaive
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])


def test_trl_grpo_reward_functions_get_the_tools(tool_exports, tiny_model_dir, tool_tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    ds = _arrow(tool_exports["trl"] / "rl.arrow")
    seen = {}

    def reward(completions, prompts, tools, id, **kwargs):
        seen.update({i: (p, t) for i, p, t in zip(id, prompts, tools)})
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=tool_tokenizer)
    trainer.train()
    routed = _routed(tool_exports["routed"], "rl")
    assert trainer.state.global_step == 1 and seen
    for i, (prompt, tools) in seen.items():
        assert tools == routed[i]["tools"] and compact_all(prompt) == compact_all(routed[i]["prompt"])


def test_trl_dpo_renders_the_prompt_with_tools(tool_exports, tiny_model_dir, tool_tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    class StoredRefDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    ds = _arrow(tool_exports["trl"] / "pairs.arrow")
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_length=1024,
                     precompute_ref_log_probs=True, report_to="none", use_cpu=True, save_strategy="no")
    trainer = StoredRefDPOTrainer(model=tiny_model_dir, args=args, train_dataset=ds, processing_class=tool_tokenizer)
    tool_pair, plain_pair = trainer.train_dataset
    prompt = tool_tokenizer.decode(tool_pair["prompt_ids"])
    assert prompt == tool_tokenizer.apply_chat_template(compact_all(ds[0]["prompt"]), tools=json.loads(GLAIVE_TOOLS),
                                                        tokenize=False, add_generation_prompt=True)
    assert '"name": "convert_currency"' in tool_tokenizer.decode(tool_pair["chosen_ids"])
    assert "<tools>" not in tool_tokenizer.decode(plain_pair["prompt_ids"])
    trainer.train()
    assert trainer.state.global_step == 1


def test_verl_rlhf_dataset_reads_the_tool_rows(tool_exports, tiny_model_dir, tool_tokenizer, tmp_path):
    """verl takes tool schemas from a tool config; one built from `extra_info.tools` loads, and each row's
    `tool_selection` names tools of that config (what ToolAgentLoop offers the row)."""
    RLHFDataset, collate_fn = _verl("verl.utils.dataset.rl_dataset", "RLHFDataset", "collate_fn")
    from omegaconf import OmegaConf

    rows = datasets.load_dataset("parquet", data_files=str(tool_exports["verl"] / "rl.parquet"), split="train")
    schemas = {s["function"]["name"]: s for r in rows if r["extra_info"]["tools"]
               for s in json.loads(r["extra_info"]["tools"])}
    config = tmp_path / "tools.yaml"
    OmegaConf.save(OmegaConf.create({"tools": [
        {"class_name": "verl.tools.base_tool.BaseTool", "config": {"type": "native"}, "tool_schema": s}
        for s in schemas.values()]}), config)
    cfg = OmegaConf.create({"max_prompt_length": 4096, "filter_overlong_prompts": True, "cache_dir": str(tmp_path),
                            "filter_overlong_prompts_workers": 1, "tool_config_path": str(config)})
    rl = RLHFDataset(data_files=[str(tool_exports["verl"] / "rl.parquet")], tokenizer=tool_tokenizer, config=cfg)
    assert sorted(s["function"]["name"] for s in rl.tool_schemas) == sorted(schemas)   # verl validated them
    routed = _routed(tool_exports["routed"], "rl")
    items = [rl[i] for i in range(len(rl))]
    assert len(items) == len(routed) == 3
    for it in items:
        want = routed[it["extra_info"]["id"]]
        assert compact_all(it["raw_prompt"]) == compact_all(want["prompt"])
        assert it["extra_info"]["tools"] == want["tools"] and it["tools_kwargs"] == {}
        names = [s["function"]["name"] for s in json.loads(want["tools"])] if want["tools"] else None
        assert it["extra_info"]["tool_selection"] == names and set(names or []) <= set(schemas)
    assert collate_fn(items)["dummy_tensor"].shape[0] == 3


def test_openrlhf_datasets_render_the_tool_turns(tool_exports, tool_tokenizer):
    PromptDataset, SFTDataset = _openrlhf()
    path = tool_exports["openrlhf"] / "sft.jsonl"
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    sft = SFTDataset(ds, tool_tokenizer, max_length=4096, num_processors=1, multiturn=True,
                     strategy=_strategy(apply_chat_template=True, input_key="messages", output_key=None))
    rows = _rows(path)
    assert len(sft) == len(rows) == 3
    tau_ids, _, tau_mask = sft[0]
    trained = tool_tokenizer.decode(tau_ids[0][tau_mask[0].bool()])
    assert '"arguments": {"user_id": "mia_li_3668"}' in trained                # the calls are trained on
    assert '"date":"2024-05-21"' in trained and "HAT023 leaves JFK" in trained
    assert "Mia Li" not in trained                                              # tool results are not
    prompts = PromptDataset(datasets.load_dataset("json", data_files=str(tool_exports["openrlhf"] / "rl.jsonl"),
                                                  split="train"),
                            tool_tokenizer, _strategy(input_key="input", label_key="label", apply_chat_template=True))
    for i, row in enumerate(_rows(tool_exports["openrlhf"] / "rl.jsonl")):
        _, prompt, _, _ = prompts[i]
        # OpenRLHF 0.11 renders `input` without `tools` (docs/exports.md): the schemas are not in the prompt
        assert prompt == tool_tokenizer.apply_chat_template(row["input"], tokenize=False, add_generation_prompt=True)
        assert "<tools>" not in prompt


THOUGHT = re.compile(r"<think>\n(.*?)\n</think>\n\n", re.DOTALL)   # LLaMA-Factory's default thought_words
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # ... and tool_call_words (>= 0.9.4)


def _function_calls(content: str) -> tuple[str, list[tuple[str, str]]]:
    """LLaMA-Factory's FunctionFormatter.apply parsing: (text before the calls, [(name, arguments JSON)])."""
    match = TOOL_CALL.search(content)
    if match:
        text, json_part = content.replace(match.group(0), ""), match.group(1)
    else:
        thought = THOUGHT.search(content)
        text, json_part = (thought.group(0), content.replace(thought.group(0), "")) if thought else ("", content)
    calls = json.loads(json_part)
    calls = calls if isinstance(calls, list) else [calls]
    return text, [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


def _tool_text(tools: str) -> list[str]:
    """LLaMA-Factory's ToolFormatter + DefaultToolUtils.tool_formatter: names of the tools it lists."""
    names = []
    for tool in json.loads(tools):
        tool = tool.get("function", "") if tool.get("type") == "function" else tool
        assert isinstance(tool["parameters"]["properties"], dict)
        names.append(tool["name"])
    return names


def test_llamafactory_reads_the_tool_rows(tool_exports):
    folder = tool_exports["llamafactory"]
    info = json.loads((folder / "dataset_info.json").read_text())
    routed = _routed(tool_exports["routed"], "sft")
    assert sorted(info) == ["curate_pairs", "curate_rl", "curate_sft"]
    for name, entry in info.items():
        ds = datasets.load_dataset("json", data_files=str(folder / entry["file_name"]), split="train")
        assert set(entry["columns"].values()) <= set(ds.column_names), name
        rows = ds.to_list()
        _check_sharegpt(rows, entry, name)
        for row in rows:
            turns = row["conversations"] + [row[s] for s in ("chosen", "rejected") if entry.get("ranking")]
            for t in turns:
                if t["from"] == entry["tags"]["function_tag"]:
                    _, calls = _function_calls(t["value"])
                    assert calls and all(json.loads(a) is not None for _, a in calls)
            if row["tools"]:
                assert _tool_text(row["tools"])
    sft = _rows(folder / "sft.jsonl")
    for row in sft:   # every call LLaMA-Factory parses is the routed call: name and arguments
        want = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for x in routed[row["id"]]["messages"] for c in x["tool_calls"] or []]
        got = [(n, json.loads(a)) for t in row["conversations"] if t["from"] == "function_call"
               for n, a in _function_calls(t["value"])[1]]
        assert got == want
    text, _ = _function_calls(sft[0]["conversations"][3]["value"])
    assert text == "<think>\nGold member; check the 20th and the 21st.\n</think>\n\nLet me look up both days."
    assert _tool_text(TAU_TOOLS) == ["get_user_details", "search_direct_flight"]
