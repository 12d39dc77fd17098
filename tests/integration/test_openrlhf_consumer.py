"""The OpenRLHF export read by OpenRLHF's own dataset classes (SFTDataset, PromptDataset), with the
options its CLI passes (`--apply_chat_template`, `--input_key`, `--output_key`, `--label_key`,
`--multiturn`). OpenRLHF is installed without dependencies (`make setup`): its dataset module needs only
torch, transformers, datasets and pylatexenc; training itself needs deepspeed and ray, not tested here."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
from transformers import AutoTokenizer

from tests.integration.test_export_consumers import exports  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def _openrlhf():
    try:
        from openrlhf.datasets import PromptDataset, SFTDataset
    except ImportError as e:
        pytest.skip(f"openrlhf.datasets is not importable here ({e}); make setup installs it into "
                    ".venv/consumers (see the Makefile)")
    return PromptDataset, SFTDataset


def _strategy(**data) -> SimpleNamespace:
    """What OpenRLHF's dataset classes read from its distributed strategy: the CLI's data options."""
    return SimpleNamespace(args=SimpleNamespace(data=SimpleNamespace(**data)), is_rank_0=lambda: True)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("multiturn", [False, True])
def test_sft_dataset_trains_on_the_demonstrations(exports, tiny_model_dir, multiturn):  # noqa: F811
    PromptDataset, SFTDataset = _openrlhf()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = exports["openrlhf"] / "sft.jsonl"
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    keys = dict(input_key="messages", output_key=None) if multiturn else dict(input_key="input", output_key="output")
    sft = SFTDataset(ds, tok, max_length=4096, strategy=_strategy(apply_chat_template=True, **keys),
                     num_processors=1, multiturn=multiturn)
    rows = _rows(path)
    assert len(sft) == len(rows)
    for i, row in enumerate(rows):
        ids, _, loss_mask = sft[i]
        trained = tok.decode(ids[0][loss_mask[0].bool()])
        last = row["messages"][-1]
        assert last["role"] == "assistant" and last["content"].strip() in trained
        if multiturn:   # every assistant turn of a transcript is trained on, and no observation
            for m in row["messages"]:
                if m["role"] == "assistant":
                    assert m["content"].strip() in trained
            users = [m["content"] for m in row["messages"] if m["role"] == "user" and len(m["content"]) > 20]
            assert not any(u in trained for u in users)


def test_prompt_dataset_gives_prompts_and_labels(exports, tiny_model_dir):  # noqa: F811
    PromptDataset, _ = _openrlhf()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = exports["openrlhf"] / "rl.jsonl"
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    prompts = PromptDataset(ds, tok, _strategy(input_key="input", label_key="label", apply_chat_template=True))
    routed = {r["id"]: r for r in _rows(path)}
    assert len(prompts) == len(routed)
    for i, row in enumerate(_rows(path)):
        source, prompt, label, _ = prompts[i]
        assert prompt == tok.apply_chat_template(row["input"], tokenize=False, add_generation_prompt=True)
        assert label == row["ground_truth"] and isinstance(label, str)
        assert source == row["datasource"] and source.startswith("curate/")
    assert any(prompts[i][2] for i in range(len(prompts)))   # GSM8K rows carry their answers
