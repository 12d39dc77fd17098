"""`curate irft`: log-probs against direct computation, chat-template consistency, reward-model scoring,
pairs, stages and counts. Tiny random models; the real SmolLM2 run is in tests/integration."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from curate import generation, logprobs, models, rewards
from curate.cli import main
from curate.io.atomic import read_arrow
from tests.conftest import tiny_llama
from tests.test_pipeline import raw_dir  # noqa: F401 (a fixture)

PROMPTS = [[{"role": "user", "content": "Name a prime number."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
           [{"role": "user", "content": "Write a haiku about autumn leaves falling on a quiet pond."}]]
REPLIES = ["7", "6, since 3+3 = 6.", "Red leaves drift and fall\nripples fade on the still pond\nthe year exhales slow"]


@pytest.fixture(scope="module")
def ref_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A second tiny Llama (other weights, same tokenizer): a reference that differs from the policy."""
    folder = tmp_path_factory.mktemp("tiny-ref")
    tiny_llama(vocab_size=len(smol_tokenizer), seed=1).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, smol_tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                      pad_token_id=smol_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return str(folder)


def direct_logp(model, context: list[int], reply: list[int]) -> float:
    """One example alone, full logits, float64 log-softmax: the reference computation."""
    ids = torch.tensor([context + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(context) + k - 1, t]) for k, t in enumerate(reply))


def test_logps_match_direct_per_example_computation(tiny_model_dir):
    ref = models.resolve(tiny_model_dir)
    tok, model = models.load_tokenizer(ref), models.load_model(ref)
    pairs = [logprobs.split_ids(tok, p, r) for p, r in zip(PROMPTS, REPLIES)]
    batched = logprobs.sequence_logps(model, pairs, batch_tokens=4096)
    one_by_one = [logprobs.sequence_logps(model, [p], batch_tokens=4096)[0] for p in pairs]
    direct = [direct_logp(model, c, r) for c, r in pairs]
    np.testing.assert_allclose(batched, direct, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one_by_one, direct, rtol=0, atol=1e-5)


def test_reply_tokens_are_what_dpo_trainer_trains_on(smol_tokenizer):
    """The reply ids are the rendered reply and its end of turn, the context is the prompt exactly as the
    generator saw it (chat template with the generation prompt)."""
    for prompt, reply in zip(PROMPTS, REPLIES):
        context, ids = logprobs.split_ids(smol_tokenizer, prompt, reply)
        assert context == logprobs.prompt_ids(smol_tokenizer, prompt)
        text = smol_tokenizer.decode(ids)
        assert text.startswith(reply) and text.rstrip().endswith("<|im_end|>")


def test_generation_continues_from_the_scoring_prompt_ids(tiny_model_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(generation, "_generate_hf", lambda ref, ids, seeds, cfg: seen.extend(ids) or [""] * len(ids))
    generation.generate(PROMPTS, generation.GenerationConfig(model=tiny_model_dir, engine="hf", max_new_tokens=4))
    tok = models.load_tokenizer(models.resolve(tiny_model_dir))
    assert seen == [logprobs.split_ids(tok, p, "x")[0] for p in PROMPTS]


def test_reward_model_scores_are_batch_independent_and_exact(rm_dir):
    convs = [[*p, {"role": "assistant", "content": r}] for p, r in zip(PROMPTS, REPLIES)]
    batched = rewards.score(rm_dir, convs, "cpu", batch_tokens=4096)
    alone = [rewards.score(rm_dir, [c], "cpu")[0] for c in convs]
    model, tok = rewards.load_reward_model(models.resolve(rm_dir), "cpu")
    direct = []
    for c in convs:   # the head applied to the last token's hidden state, by hand
        ids = torch.tensor([tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
            direct.append(float(model.score(hidden)[0]))
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched, direct, rtol=0, atol=1e-5)
    assert len(set(np.round(batched, 6))) == len(convs)


def records(tmp_path, real_data):
    raw = tmp_path / "raw"
    raw.mkdir()
    seed = (real_data / "self_instruct_seed_tasks" / "seed_tasks.lines1-100.jsonl").read_text().splitlines()[:4]
    hh = (real_data / "hh_rlhf_harmless" / "harmless-base.test.shared_prompt_groups.jsonl").read_text().splitlines()[:4]
    (raw / "seed.jsonl").write_text("\n".join(seed) + "\n")
    (raw / "hh.jsonl").write_text("\n".join(hh) + "\n")
    return raw


def irft(raw, out, model, *extra):
    return main(["irft", "--input", str(raw), "--out", str(out), "--model", model, "--max-new-tokens", "12",
                 "--shard-size", "3", *extra])


def load(out) -> pa.Table:
    return pa.concat_tables([read_arrow(out / f) for f in json.loads((out / "manifest.json").read_text())["files"]["pairs"]])


def test_irft_stages_pairs_and_implicit_rewards(tmp_path, real_data, tiny_model_dir, ref_model_dir, rm_dir):
    raw = records(tmp_path, real_data)
    out = tmp_path / "irft"
    assert irft(raw, out, tiny_model_dir, "--ref-model", ref_model_dir, "--reward-model", rm_dir,
                "--stages", "2", "--stage", "1", "--beta", "0.5") == 0
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == 8 and c["input"] == c["pairs"] + c["identical"] + c["other_stages"] + c["quarantined"] + c["duplicates"]
    index = read_arrow(out / "stage_index" / "part-00000.arrow").to_pylist()
    assert len(index) == 8 and {r["stage"] for r in index} <= {0, 1}
    rows = load(out).to_pylist()
    assert len(rows) == c["pairs"] == sum(r["stage"] == 1 for r in index) - c["identical"]
    assert {r["id"] for r in rows} <= {r["id"] for r in index if r["stage"] == 1}

    policy, ref = (models.load_model(models.resolve(d)) for d in (tiny_model_dir, ref_model_dir))
    tok = models.load_tokenizer(models.resolve(tiny_model_dir))
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert r["chosen"] != r["rejected"] and r["generator"] == tiny_model_dir
        for side in ("chosen", "rejected"):
            context, reply = logprobs.split_ids(tok, r["prompt"], r[side][0]["content"])
            assert r[f"{side}_len_tokens"] == len(reply)
            assert r[f"{side}_logps"] == pytest.approx(direct_logp(policy, context, reply), abs=1e-4)
            assert r[f"ref_{side}_logps"] == pytest.approx(direct_logp(ref, context, reply), abs=1e-4)
            assert r[f"implicit_reward_{side}"] == pytest.approx(0.5 * (r[f"{side}_logps"] - r[f"ref_{side}_logps"]))
            conv = [*r["prompt"], *r[side]]
            assert r[f"rm_score_{side}"] == pytest.approx(float(rewards.score(rm_dir, [conv], "cpu")[0]), abs=1e-5)
        assert r["logp_gap"] == pytest.approx(r["chosen_logps"] - r["rejected_logps"])
    wins = np.mean([r["implicit_reward_chosen"] > r["implicit_reward_rejected"] for r in rows])
    assert m["win_rates"]["implicit_reward"]["demo_wins"] == pytest.approx(wins)
    assert m["win_rates"]["reward_model"]["pairs"] == len(rows)
    page = (out / "report.html").read_text()
    assert all(f'id="fig-{c}"' in page for c in ("implicit_reward_chosen", "rm_score_rejected", "logp_gap"))

    before = {p: p.read_bytes() for p in sorted(out.rglob("*.arrow")) if ".work" not in p.parts}
    assert irft(raw, out, tiny_model_dir, "--ref-model", ref_model_dir, "--reward-model", rm_dir,
                "--stages", "2", "--stage", "1", "--beta", "0.5") == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["cache"]["continuation"]["computed"] == again["cache"]["pair_scores"]["computed"] == 0
    assert {p: p.read_bytes() for p in before} == before


def test_pair_identical_to_the_demonstration_is_dropped_and_counted(tmp_path, tiny_model_dir, monkeypatch):
    """A generator that repeats one demonstration word for word: that pair teaches nothing and is dropped."""
    def parrot(conversations, cfg, n=1, seeds=None, tools=None):
        return [["Paris."] if c[-1]["content"] == "Capital of France?" else ["No idea."] for c in conversations]

    monkeypatch.setattr(generation, "generate", parrot)
    raw = tmp_path / "d.jsonl"
    raw.write_text("".join(json.dumps({"prompt": p, "completion": "Paris."}) + "\n"
                           for p in ("Capital of France?", "Where is the Louvre?")))
    out = tmp_path / "irft"
    assert irft(raw, out, tiny_model_dir) == 0
    c = json.loads((out / "manifest.json").read_text())["counts"]
    assert (c["input"], c["pairs"], c["identical"], c["other_stages"], c["quarantined"]) == (2, 1, 1, 0, 0)
    assert [r["rejected"][0]["content"] for r in load(out).to_pylist()] == ["No idea."]


def test_bad_stage_options_are_input_errors(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert irft(tmp_path / "d.jsonl", tmp_path / "o", tiny_model_dir, "--stages", "2", "--stage", "2") == 2
    assert "stage" in capsys.readouterr().err


def test_reference_logps_equal_what_dpo_trainer_computes(tmp_path, real_data, tiny_model_dir):
    """TRL's DPOTrainer, asked to precompute reference log-probs with the same model, gets our numbers:
    the pairs can go to it precomputed (no reference model in memory during training)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = tmp_path / "irft"
    assert irft(records(tmp_path, real_data), out, tiny_model_dir) == 0
    ours = load(out)
    plain = datasets.Dataset.from_list(ours.select(["prompt", "chosen", "rejected"]).to_pylist())
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=4096, precompute_ref_log_probs=True,
                     per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no")
    trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=plain,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trl = trainer.train_dataset
    for side in ("chosen", "rejected"):  # TRL sums in float32 (sums of ~1e3: ~1e-5 relative), we in float64
        np.testing.assert_allclose(trl[f"ref_{side}_logps"], ours.column(f"ref_{side}_logps").to_numpy(), rtol=2e-5)


def test_prism_reward_model_scores_every_row(raw_dir, tmp_path, tiny_model_dir, rm_dir):
    from tests.test_pipeline import load as load_part, prism

    out = tmp_path / "routed"
    assert prism(raw_dir, out, tiny_model_dir, "--reward-model", rm_dir) == 0
    rows = [r for part in ("sft", "rl") for r in load_part(out, part).to_pylist()]
    expected = rewards.score(rm_dir, [r["messages"] for r in rows], "cpu")
    np.testing.assert_allclose([r["rm_score"] for r in rows], expected, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["cache"]["reward"]["computed"] > 0
