"""Every export read by its real consumer: TRL trainers take one optimisation step (tiny random Llama,
CPU), HF `datasets` and polars load every file, verl's own dataset classes load the verl export, and
LLaMA-Factory's dataset_info.json is checked against the rows by LLaMA-Factory's ShareGPT rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import polars as pl
import pytest
import torch

from curate.config import PrismConfig
from curate.formats.export import TARGETS, export
from curate.io.atomic import read_arrow, write_arrow, write_json
from curate.jobs.prism import run_prism

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
LOADER = {"arrow": "arrow", "parquet": "parquet", "jsonl": "json"}
POLARS = {"arrow": lambda f: pl.read_ipc_stream(f), "parquet": lambda f: pl.scan_parquet(f).collect(),
          "jsonl": lambda f: pl.scan_ndjson(f).collect()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A real routed folder (4 GSM8K problems, 4 ALFWorld transcripts, tiny probe) exported to every target."""
    root = tmp_path_factory.mktemp("export")
    inputs = []
    for name in ("gsm8k_prompt_completion.jsonl", "alfworld_knowagent.jsonl"):
        lines = (REPO / "data/demo" / name).read_text().splitlines()[:4]
        (root / name).write_text("\n".join(lines) + "\n")
        inputs.append(str(root / name))
    run_prism(PrismConfig(input=inputs, out=str(root / "routed"), model=tiny_model_dir, max_length=256,
                          batch_tokens=2048))
    return {to: (export(root / "routed", to, root / to), root / to)[1] for to in TARGETS} | {"routed": root / "routed"}


def test_every_file_loads_with_datasets_and_polars(exports):
    for to in TARGETS:
        manifest = json.loads((exports[to] / "manifest.json").read_text())
        assert manifest["counts"] == {"sft": 4, "rl": 4}
        for name, entry in manifest["files"].items():
            path = str(exports[to] / name)
            ds = datasets.load_dataset(LOADER[name.rsplit(".", 1)[1]], data_files=path, split="train")
            assert len(ds) == entry["rows"] == POLARS[name.rsplit(".", 1)[1]](path).height
            assert set(entry["columns"]) <= set(ds.column_names)


def test_trl_sft_trainer_takes_a_step(exports, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = datasets.load_dataset("arrow", data_files=str(exports["trl"] / "sft.arrow"), split="train")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_length=64,
                     learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_trl_grpo_trainer_reads_ground_truth(exports, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    ds = datasets.load_dataset("arrow", data_files=str(exports["trl"] / "rl.arrow"), split="train")
    seen = []

    def contains_answer(completions, ground_truth, id, **kwargs):   # columns arrive as keyword arguments
        seen.extend(zip(id, ground_truth))
        return [float(bool(gt) and gt in c[-1]["content"]) for c, gt in zip(completions, ground_truth)]

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=contains_answer, args=args, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    assert trainer.state.global_step == 1 and seen
    expected = dict(zip(ds["id"], ds["ground_truth"]))
    assert all(expected[i] == gt and isinstance(gt, str) for i, gt in seen)


def _pairs_folder(exports, folder: Path, ref_shift: float) -> Path:
    """A pairs/ partition as `curate irft` will write it, with precomputed reference log-probs."""
    rows = []
    for r in read_arrow(exports["routed"] / "sft/part-00000.arrow").to_pylist():
        rows.append({"id": r["id"], "source": r["source"], "source_index": r["source_index"], "prompt": r["prompt"],
                     "chosen": r["messages"][len(r["prompt"]):len(r["prompt"]) + 1],
                     "rejected": [{"role": "assistant", "content": "I do not know."}],
                     "ref_chosen_logps": -20.0 + ref_shift, "ref_rejected_logps": -10.0,
                     "implicit_reward_chosen": 0.1, "implicit_reward_rejected": -0.1, "rm_score_chosen": None,
                     "rm_score_rejected": None, "stage": 0, "generator": "demo"})
    import pyarrow as pa

    write_arrow(folder / "pairs/part-00000.arrow", pa.Table.from_pylist(rows))
    write_json(folder / "manifest.json", {"counts": {"pairs": len(rows)}})
    return folder


def _dpo_step(pairs_file: Path, tiny_model_dir: str, out: Path, beta: float) -> dict:
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PrecomputedRefDPOTrainer(DPOTrainer):
        """TRL recomputes reference log-probs when `precompute_ref_log_probs=True`; the export already
        holds them (summed over completion tokens, as TRL computes them), so use the dataset's columns."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)
            return dataset

    ds = datasets.load_dataset("arrow", data_files=str(pairs_file), split="train")
    args = DPOConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, max_length=96, beta=beta,
                     precompute_ref_log_probs=True, report_to="none", use_cpu=True, save_strategy="no",
                     logging_steps=1, seed=0)
    trainer = PrecomputedRefDPOTrainer(model=tiny_model_dir, args=args, train_dataset=ds,
                                       processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert trainer.ref_model is None           # no reference forward: the columns are the reference
    trainer.train()
    assert trainer.state.global_step == 1
    return trainer.state.log_history[0]


def test_trl_dpo_trainer_uses_precomputed_reference(exports, tiny_model_dir, tmp_path):
    beta, logs = 0.5, []
    for k, shift in enumerate((0.0, 3.0)):
        folder = _pairs_folder(exports, tmp_path / f"irft{k}", shift)
        export(folder, "trl", tmp_path / f"trl{k}")
        logs.append(_dpo_step(tmp_path / f"trl{k}/pairs.arrow", tiny_model_dir, tmp_path / f"run{k}", beta))
    # rewards/chosen = beta * (policy logp - ref logp): same policy, reference moved by +3 -> reward by -3 beta
    assert logs[1]["rewards/chosen"] - logs[0]["rewards/chosen"] == pytest.approx(-3.0 * beta, abs=1e-3)
    assert logs[1]["rewards/rejected"] == pytest.approx(logs[0]["rewards/rejected"], abs=1e-4)


VERL_INSTALL = "make setup (into .venv/consumers; see the Makefile)"


def _verl_transformers_shim() -> None:
    """verl 0.9.1's SFT dataset module imports its Qwen2-VL patches, which import an output class that
    newer transformers renamed (Qwen2VLCausalLMOutputWithPast -> MultimodalCausalLMOutputWithPast). Text
    datasets never use it: the old name is given the new class, so verl's own dataset class can load ours."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    if not hasattr(qwen2_vl, "Qwen2VLCausalLMOutputWithPast") and hasattr(qwen2_vl, "MultimodalCausalLMOutputWithPast"):
        qwen2_vl.Qwen2VLCausalLMOutputWithPast = qwen2_vl.MultimodalCausalLMOutputWithPast


def _verl(module: str, *names: str):
    """verl's own classes, or a skip that says why (verl pins transformers < 5.11; its RL dataset module
    imports fine with newer versions, its SFT dataset module does not)."""
    import importlib

    _verl_transformers_shim()
    try:
        mod = importlib.import_module(module)
        return [getattr(mod, n) for n in names]
    except ImportError as e:
        import importlib.util

        hint = ("verl is installed but this module needs an older transformers (verl pins < 5.11)"
                if importlib.util.find_spec("verl") else f"install verl with: {VERL_INSTALL}")
        pytest.skip(f"{module} is not importable here ({e}); {hint}")


def test_verl_rlhf_dataset_loads_the_export(exports, tiny_model_dir, tmp_path):
    RLHFDataset, collate_fn = _verl("verl.utils.dataset.rl_dataset", "RLHFDataset", "collate_fn")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    cfg = OmegaConf.create({"max_prompt_length": 4096, "filter_overlong_prompts": True, "cache_dir": str(tmp_path),
                            "filter_overlong_prompts_workers": 1})
    rl = RLHFDataset(data_files=[str(exports["verl"] / "rl.parquet")],
                     tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), config=cfg)
    expected = read_arrow(exports["trl"] / "rl.arrow").to_pylist()
    assert len(rl) == len(expected) == 4
    items = [rl[i] for i in range(len(rl))]
    assert [it["raw_prompt"] for it in items] == [r["prompt"] for r in expected]
    assert [it["index"] for it in items] == [0, 1, 2, 3]
    assert [it["reward_model"]["ground_truth"] for it in items] == [r["ground_truth"] for r in expected]
    assert [it["extra_info"]["id"] for it in items] == [r["id"] for r in expected]
    if "demo" in expected[0]:   # the prefix stage ran: Prefix-RFT's `demos` column
        assert [it["demos"] for it in items] == [[r["demo"]] if r["demo"] else [] for r in expected]
    batch = collate_fn(items)
    assert batch["dummy_tensor"].shape[0] == 4 and len(batch["data_source"]) == 4


def test_verl_sft_dataset_loads_the_export(exports, tiny_model_dir):
    (MultiTurnSFTDataset,) = _verl("verl.utils.dataset.multiturn_sft_dataset", "MultiTurnSFTDataset")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    sft = MultiTurnSFTDataset(parquet_files=[str(exports["verl"] / "sft.parquet")],
                              tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                              config=OmegaConf.create({"max_length": 4096, "truncation": "right"}))
    assert len(sft) == 4 and int(sft[0]["loss_mask"].sum()) > 0


def _check_sharegpt(rows: list[dict], entry: dict, name: str) -> None:
    """LLaMA-Factory's ShareGPT converter rules (SharegptDatasetConverter); it skips a row that breaks
    one, so none may. function_call turns take assistant slots, observations user slots."""
    cols, tags = entry["columns"], entry["tags"]
    odd = (tags["user_tag"], tags["observation_tag"])
    even = (tags["assistant_tag"], tags.get("function_tag", "function_call"))
    for i, row in enumerate(rows):
        turns = row[cols["messages"]]
        assert isinstance(row[cols["system"]], str), f"{name}:{i} system"
        for k, t in enumerate(turns):
            assert set(t) == {tags["role_tag"], tags["content_tag"]}, f"{name}:{i} turn keys {set(t)}"
            assert t[tags["role_tag"]] in (odd, even)[k % 2], f"{name}:{i} turn {k} role {t[tags['role_tag']]}"
        assert len(turns) % 2 == (1 if entry.get("ranking") else 0), f"{name}:{i} has {len(turns)} turns"
        if entry.get("ranking"):
            for side in ("chosen", "rejected"):
                assert row[cols[side]][tags["role_tag"]] in even, f"{name}:{i} {side}"


def test_llamafactory_dataset_info_matches_the_files(exports, tmp_path):
    info = json.loads((exports["llamafactory"] / "dataset_info.json").read_text())
    folder = _pairs_folder(exports, tmp_path / "irft", 0.0)
    export(folder, "llamafactory", tmp_path / "lf")
    pairs_info = json.loads((tmp_path / "lf/dataset_info.json").read_text())
    registered = [(exports["llamafactory"], n, e) for n, e in info.items()] + \
                 [(tmp_path / "lf", n, e) for n, e in pairs_info.items()]
    assert sorted(n for _, n, _ in registered) == ["curate_pairs", "curate_rl", "curate_sft"]
    for folder, name, entry in registered:
        assert entry["formatting"] == "sharegpt"
        ds = datasets.load_dataset("json", data_files=str(folder / entry["file_name"]), split="train")
        assert set(entry["columns"].values()) <= set(ds.column_names), name
        _check_sharegpt(ds.to_list(), entry, name)
