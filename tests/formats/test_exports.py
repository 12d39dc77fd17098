"""`curate export` on a small hand-built routed folder whose expected output is written out here:
trimming, ground_truth typing, verl/OpenRLHF/LLaMA-Factory layouts, determinism, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import cli, schema
from curate.formats.export import TARGETS, export
from curate.io.atomic import file_sha256, read_arrow, write_arrow, write_json


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def routed_row(i: int, messages: list[dict], route: str, **extra) -> dict:
    prompt = messages[:next(k for k, m in enumerate(messages) if m["role"] == "assistant")]
    return {"id": f"id{i}", "source": "in.jsonl", "source_index": i, "format": "messages", "messages": messages,
            "prompt": prompt, "n_tokens": 10, "n_loss_tokens": 4, "probe_loss": 1.5, "grad_norms": [0.1, 0.2],
            "grad_norm_total": 0.3, "gini": 0.1 * i, "cv": 0.2, "kurtosis": 3.0, "magnitude": 0.3, "random": 0.5,
            "score": 0.1 * i, "route": route, "threshold": 0.25, **extra}


MATH = [msg("user", "2+2?"), msg("assistant", "4")]
AGENT = [msg("system", "You are an agent."), msg("user", "Find the mug."), msg("assistant", "go to desk"),
         msg("user", "You see a mug."), msg("tool", "inventory: empty"), msg("assistant", "take mug"),
         msg("user", "You took the mug.")]                        # ends with an observation
AGENT_TRIMMED = AGENT[:-1]


def write_routed(folder: Path, partitions: dict[str, list[list[dict]]], table_schema=None) -> Path:
    """partitions: {name: [shard rows, ...]}; one Arrow stream file per shard plus a manifest."""
    for part, shards in partitions.items():
        for k, rows in enumerate(shards):
            write_arrow(folder / part / f"part-{k:05d}.arrow", pa.Table.from_pylist(rows, schema=table_schema))
    write_json(folder / "manifest.json", {"counts": {p: sum(map(len, s)) for p, s in partitions.items()}})
    return folder


@pytest.fixture
def routed(tmp_path) -> Path:
    s = schema.arrow_schema(schema.ROUTED)
    for name, type_ in (("demo", pa.string()), ("demo_len_tokens", pa.int32()), ("cut_points", pa.list_(pa.int32()))):
        s = s if name in s.names else s.append(pa.field(name, type_))   # Prefix-RFT columns
    sft = [[routed_row(0, MATH, "sft", ground_truth="4")], [routed_row(1, AGENT, "sft")]]
    # shard 0 has no reward at all (an all-null column); shard 1 has a failed agent run (reward 0)
    rl = [[routed_row(2, MATH, "rl", ground_truth="4", demo="4", demo_len_tokens=1, cut_points=[])],
          [routed_row(3, AGENT, "rl", reward=0.0, demo="go to desk ... take mug", demo_len_tokens=7, cut_points=[3])]]
    folder = write_routed(tmp_path / "routed", {"sft": sft, "rl": rl}, s)
    shard = read_arrow(folder / "rl/part-00000.arrow")   # as a writer inferring types would leave it
    i = shard.column_names.index("reward")
    write_arrow(folder / "rl/part-00000.arrow", shard.set_column(i, pa.field("reward", pa.null()), pa.nulls(1)))
    return folder


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trl_trims_sft_and_types_ground_truth(routed, tmp_path):
    m = export(routed, "trl", tmp_path / "trl")
    sft, rl = read_arrow(tmp_path / "trl/sft.arrow"), read_arrow(tmp_path / "trl/rl.arrow")
    assert sft.column("messages").to_pylist() == [MATH, AGENT_TRIMMED]
    assert sft.column("ground_truth").to_pylist() == ["4", ""]
    assert rl.column("ground_truth").type == pa.string() and rl.column("ground_truth").to_pylist() == ["4", ""]
    assert rl.column("prompt").to_pylist() == [MATH[:1], AGENT[:2]]
    assert rl.column("reward").to_pylist() == [None, 0.0]        # the shards' types were unified
    assert set(schema.columns(schema.ROUTED)) <= set(rl.column_names)   # every column reaches reward functions
    assert m["counts"] == {"sft": 2, "rl": 2} and m["files"]["rl.arrow"]["sha256"] == file_sha256(tmp_path / "trl/rl.arrow")


def test_verl_layout(routed, tmp_path):
    export(routed, "verl", tmp_path / "verl")
    rl = pq.read_table(tmp_path / "verl/rl.parquet").to_pylist()
    assert [r["reward_model"] for r in rl] == [{"style": "rule", "ground_truth": "4"}, {"style": "rule", "ground_truth": ""}]
    assert [r["extra_info"]["index"] for r in rl] == [0, 1] and {r["extra_info"]["split"] for r in rl} == {"train"}
    assert [r["extra_info"]["cut_points"] for r in rl] == [[], [3]]
    assert [r["ability"] for r in rl] == ["verifiable", "chat"]
    assert [r["data_source"] for r in rl] == ["curate/messages"] * 2
    assert [r["demos"] for r in rl] == [["4"], ["go to desk ... take mug"]]
    assert [r["demos_corr"] for r in rl] == [[True], [False]]    # reward 0 recorded: not a correct demo
    sft = pq.read_table(tmp_path / "verl/sft.parquet")
    assert sft.column("messages").to_pylist() == [MATH, AGENT_TRIMMED] and "grad_norms" not in sft.column_names


def test_verl_without_prefix_columns_has_no_demos(tmp_path):
    s = schema.arrow_schema(schema.ROUTED)
    s = pa.schema([f for f in s if f.name not in ("demo", "demo_len_tokens", "cut_points")])  # no prefix stage
    folder = write_routed(tmp_path / "r", {"rl": [[routed_row(0, MATH, "rl", ground_truth="4")]]}, s)
    export(folder, "verl", tmp_path / "verl")
    t = pq.read_table(tmp_path / "verl/rl.parquet")
    assert "demos" not in t.column_names and t.column("reward_model").to_pylist()[0]["ground_truth"] == "4"


def test_openrlhf_rows_render_with_the_chat_template(routed, tmp_path, smol_tokenizer):
    export(routed, "openrlhf", tmp_path / "o")
    sft, rl = jsonl(tmp_path / "o/sft.jsonl"), jsonl(tmp_path / "o/rl.jsonl")
    assert [r["messages"] for r in sft] == [MATH, AGENT_TRIMMED]
    assert [r["label"] for r in rl] == ["4", ""] and [r["input"] for r in rl] == [MATH[:1], AGENT[:2]]
    for row in sft:   # what OpenRLHF's SFTDataset does with --input_key input --output_key output --apply_chat_template
        prompt = smol_tokenizer.apply_chat_template(row["input"], tokenize=False, add_generation_prompt=True)
        full = smol_tokenizer.apply_chat_template(row["input"] + row["output"], tokenize=False)
        assert full.startswith(prompt) and row["messages"][-1]["content"] in full[len(prompt):]


def test_llamafactory_sharegpt_alternates(routed, tmp_path):
    export(routed, "llamafactory", tmp_path / "lf")
    sft = jsonl(tmp_path / "lf/sft.jsonl")
    assert sft[1]["system"] == "You are an agent."
    assert sft[1]["conversations"] == [
        {"from": "human", "value": "Find the mug."}, {"from": "gpt", "value": "go to desk"},
        {"from": "human", "value": "You see a mug.\n\ninventory: empty"}, {"from": "gpt", "value": "take mug"}]
    rl = jsonl(tmp_path / "lf/rl.jsonl")
    assert [[t["from"] for t in r["conversations"]] for r in rl] == [["human", "gpt"]] * 2
    info = json.loads((tmp_path / "lf/dataset_info.json").read_text())
    assert {k: v["file_name"] for k, v in info.items()} == {"curate_sft": "sft.jsonl", "curate_rl": "rl.jsonl"}


def test_pairs_strip_the_prompt_and_verl_skips_them(tmp_path):
    prompt = [msg("user", "2+2?")]
    rows = [{"id": "p0", "prompt": prompt, "chosen": prompt + [msg("assistant", "4")],
             "rejected": [msg("assistant", "5")], "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]
    folder = write_routed(tmp_path / "irft", {"pairs": [rows]})
    export(folder, "trl", tmp_path / "trl")
    t = read_arrow(tmp_path / "trl/pairs.arrow").to_pylist()[0]
    assert t["chosen"] == [msg("assistant", "4")] and t["rejected"] == [msg("assistant", "5")]
    assert t["ref_chosen_logps"] == -1.0
    export(folder, "llamafactory", tmp_path / "lf")
    lf = jsonl(tmp_path / "lf/pairs.jsonl")[0]
    assert lf["chosen"] == {"from": "gpt", "value": "4"} and lf["conversations"] == [{"from": "human", "value": "2+2?"}]
    assert json.loads((tmp_path / "lf/dataset_info.json").read_text())["curate_pairs"]["ranking"] is True
    with pytest.raises(ValueError, match="no \\*.arrow shards"):   # pairs are all there is, and verl skips them
        export(write_routed(tmp_path / "empty", {}), "verl", tmp_path / "v")
    m = export(write_routed(tmp_path / "both", {"pairs": [rows], "rl": [[routed_row(0, MATH, "rl")]]},),
               "verl", tmp_path / "v2")
    assert "pairs" in m["skipped"] and m["counts"] == {"rl": 1}


def test_drift_folder_exports_to_trl(tmp_path):
    rows = [{"id": "d0", "messages": MATH + [msg("user", "Incorrect. Please think again.")], "weight": 1.5}]
    export(write_routed(tmp_path / "drift", {"sft": [rows]}), "trl", tmp_path / "trl")
    t = read_arrow(tmp_path / "trl/sft.arrow").to_pylist()
    assert t == [{"id": "d0", "messages": MATH, "weight": 1.5}]


@pytest.mark.parametrize("to", sorted(TARGETS))
def test_same_input_same_bytes(routed, tmp_path, to):
    export(routed, to, tmp_path / "a")
    export(routed, to, tmp_path / "b")
    export(routed, to, tmp_path / "a")           # a rerun replaces the earlier export in place
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all(file_sha256(tmp_path / "a" / n) == file_sha256(tmp_path / "b" / n) for n in names)
    assert not list(tmp_path.glob(".*staging*"))


def test_bad_inputs_are_usage_errors(routed, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope"):
        export(tmp_path / "nope", "trl", tmp_path / "x")
    (routed / "manifest.json").rename(tmp_path / "m.json")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        export(routed, "trl", tmp_path / "x")
    (tmp_path / "m.json").rename(routed / "manifest.json")
    with pytest.raises(ValueError, match="overwrite the routed folder"):
        export(routed, "trl", routed / "sft")
    with pytest.raises(ValueError, match="overwrite the routed folder"):
        export(routed, "trl", tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a curate export"):
        export(routed, "trl", tmp_path / "mine")
    with pytest.raises(ValueError, match="unknown export target"):
        export(routed, "axolotl", tmp_path / "x")
    assert cli.main(["export", "--routed", str(tmp_path / "nope"), "--to", "trl", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["export", "--routed", str(routed), "--to", "verl", "--out", str(tmp_path / "ok")]) == 0


def test_bad_row_is_skipped_and_named_in_the_manifest(tmp_path):
    """A row the target cannot write is skipped, not fatal: counted by reason, its shard and record named
    (more cases, one per kind and target, in test_export_skips.py)."""
    rows = [{"id": "bad1", "source": "x.jsonl", "source_index": 7, "prompt": [msg("user", "q")],
             "chosen": [msg("assistant", "a")], "rejected": [msg("user", "not a reply")]}]
    folder = write_routed(tmp_path / "irft", {"pairs": [rows]})
    m = export(folder, "trl", tmp_path / "trl")
    assert m["counts"] == {"pairs": 0} and m["rows_in"] == {"pairs": 1}
    assert m["rows_skipped"] == {"total": 1, "by_partition": {"pairs": {"`rejected` does not end with an assistant turn": 1}},
                                 "examples": {"pairs": [{"reason": "`rejected` does not end with an assistant turn",
                                                         "shard": "pairs/part-00000.arrow", "id": "bad1",
                                                         "source": "x.jsonl", "source_index": 7}]}}
    assert read_arrow(tmp_path / "trl/pairs.arrow").num_rows == 0
