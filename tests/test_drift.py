"""`curate drift` with a tiny random Llama (fast): multi-turn structure, returns -> weights, counts, cache,
the recorded verifier on real ALFWorld trajectories, the pipeline file and the TRL example."""

import hashlib
import importlib.util
import json
import math
from collections import defaultdict

import pyarrow as pa
import pytest

from curate import generation
from curate.cli import main
from curate.messages import compact_all
from curate.io.atomic import read_arrow
from curate.schema import arrow_schema, load_json_schema
from curate.stages.configs import DEFAULT_FEEDBACK, RolloutConfig
from curate.stages.rollout import Rollout
from tests.conftest import REPO

SMALL = ["--samples", "2", "--turns", "3", "--max-new-tokens", "6", "--shard-size", "2", "--device", "cpu"]


def by_hash(record: dict, reply: str) -> bool:
    """A verifier with mixed, reproducible outcomes on random text."""
    return hashlib.sha256(reply.encode()).digest()[0] % 4 == 0


def always(record: dict, reply: str) -> bool:
    return True


def never(record: dict, reply: str) -> bool:
    return False


@pytest.fixture(scope="module")
def raw(tmp_path_factory, real_data):
    folder = tmp_path_factory.mktemp("raw")
    gsm = (real_data / "gsm8k" / "test.lines1-300.jsonl").read_text().splitlines()[:4]
    no_truth = json.dumps({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]})
    (folder / "gsm8k.jsonl").write_text("\n".join(gsm + [gsm[1], no_truth, '{"question": "broken']) + "\n")
    return folder


def drift(raw, out, model, *extra):
    return main(["drift", "--input", str(raw), "--out", str(out), "--model", model, *SMALL, *extra])


def load(out) -> list[dict]:
    files = sorted((out / "sft").glob("*.arrow"))
    return pa.concat_tables([read_arrow(f) for f in files]).to_pylist() if files else []


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def check_weights(rows, beta):
    groups = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r)
    for members in groups.values():
        z = [math.exp(r["return"] / beta) for r in members]
        for r, zi in zip(members, z):
            assert r["weight"] == pytest.approx(zi * len(z) / sum(z), rel=1e-9)
        assert len({r["group_id"] for r in members}) == 1


@pytest.fixture(scope="module")
def hashed(raw, tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("hashed") / "drift"
    assert drift(raw, out, tiny_model_dir, "--verifier", "tests.test_drift:by_hash") == 0
    return out


def test_multi_turn_structure_feedback_only_after_failures(hashed):
    rows = [{**r, **{k: compact_all(r[k]) for k in ("messages", "prompt", "train_context")}} for r in load(hashed)]
    assert len(rows) == 4 * 2 + 2 and {r["sample_index"] for r in rows} == {0, 1}   # 5 prompts x K=2
    assert any(r["success"] for r in rows) and not all(r["success"] for r in rows)
    for r in rows:
        msgs, n_prompt = r["messages"], len(r["prompt"])
        assert msgs[:n_prompt] == r["prompt"] and msgs[-1]["role"] == "assistant"
        answers = msgs[n_prompt::2]
        assert [m["role"] for m in answers] == ["assistant"] * r["turns"]
        assert all(m == {"role": "user", "content": DEFAULT_FEEDBACK} for m in msgs[n_prompt + 1::2])
        verdicts = [by_hash({}, m["content"]) for m in answers]
        assert not any(verdicts[:-1])                     # feedback followed only wrong answers
        assert r["success"] == verdicts[-1] and (r["success"] or r["turns"] == 3)
        assert r["t_star"] == (r["turns"] if r["success"] else None)
        assert r["train_context"] == msgs[:-1] and r["train_target"] == msgs[-1]["content"]
        assert r["return_outcome"] == (0.9 ** (r["turns"] - 1) if r["success"] else 0.0)
        assert r["return"] == pytest.approx(r["return_outcome"] + r["return_format"] + r["return_repetition"])
    check_weights(rows, 0.1)


def test_counts_reconcile_and_quarantine(hashed):
    m = manifest(hashed)
    contract = load_json_schema("drift_manifest")
    assert set(contract["required"]) <= set(m)
    assert set(contract["properties"]["counts"]["required"]) <= set(m["counts"])
    c = m["counts"]
    assert c["input"] == 7 and c["duplicates"] == 1 and c["quarantined"] == 1 and c["prompts"] == 5
    assert c["input"] == c["prompts"] + c["prompts_dropped"] + c["quarantined"] + c["duplicates"]
    assert c["sft"] == 10 == m["weights"]["rows"] and m["weights"]["mean_weight"] == pytest.approx(1.0)
    assert m["model"]["sha256"] and m["generation"]["engine"] == "hf" and m["rollout"]["turns"] == 3
    assert sorted(p.name for p in hashed.iterdir()) == [".work", "manifest.json", "quarantine", "report.html", "sft"]
    for f in (hashed / "sft").iterdir():   # the column contract: schemas/drift.schema.json
        assert f.suffix == ".arrow" and read_arrow(f).schema == arrow_schema("drift")


def test_math_verifier_all_fail_keep_drop_and_cache(raw, tmp_path, tiny_model_dir):
    out, work = tmp_path / "keep", tmp_path / "work"
    assert drift(raw, out, tiny_model_dir, "--work", str(work)) == 0
    rows, m = load(out), manifest(out)
    assert not any(r["success"] for r in rows) and all(r["turns"] == 3 for r in rows)  # random text: all wrong
    q = [json.loads(x) for x in (out / "quarantine" / "part-00000.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in q] == ["ingest", "rollout"] and "needs ground_truth" in q[1]["reason"]
    assert m["counts"]["prompts"] == 4 and m["weights"]["groups_all_fail"] == 4
    before = {p.name: p.read_bytes() for p in (out / "sft").iterdir()}

    assert drift(raw, out, tiny_model_dir, "--work", str(work)) == 0      # unchanged: a cache hit, same bytes
    assert manifest(out)["cache"]["rollout"] == {"computed": 0, "cached": 3}
    assert {p.name: p.read_bytes() for p in (out / "sft").iterdir()} == before

    drop = tmp_path / "drop"   # new weights policy on the same rollouts: nothing regenerated
    assert drift(raw, drop, tiny_model_dir, "--work", str(work), "--all-fail", "drop", "--beta", "1") == 0
    c = manifest(drop)["counts"]
    assert manifest(drop)["cache"]["rollout"]["computed"] == 0 and load(drop) == []
    assert c["prompts"] == 0 and c["prompts_dropped"] == 4 and c["rows_dropped"] == 8
    assert c["input"] == c["prompts"] + c["prompts_dropped"] + c["quarantined"] + c["duplicates"]

    assert drift(raw, tmp_path / "seed1", tiny_model_dir, "--work", str(work), "--seed", "1") == 0
    assert manifest(tmp_path / "seed1")["cache"]["rollout"]["computed"] == 3


def _table(records):
    from curate import schema

    return pa.Table.from_pylist(records, schema=schema.arrow_schema(schema.RECORD))


def _records(n):
    return [{"id": f"r{i}", "source": "x", "source_index": i, "format": "messages", "ground_truth": str(i),
             "reward": None, "messages": [{"role": "user", "content": f"What is {i} + 0?"},
                                          {"role": "assistant", "content": str(i)}]} for i in range(n)]


def test_rollout_stage_turns_and_shard_independence(tiny_model_dir):
    gen = generation.GenerationConfig(model=tiny_model_dir, max_new_tokens=4, device="cpu")
    shard = _table(_records(3))
    right = Rollout(RolloutConfig(gen, samples=2, turns=4, verifier="tests.test_drift:always")).run(shard)
    assert all(len(t) == 2 for t in right.column("trajectories").to_pylist())
    assert all(len(traj) == 2 for ts in right.column("trajectories").to_pylist() for traj in ts)
    wrong = Rollout(RolloutConfig(gen, samples=2, turns=4, verifier="tests.test_drift:never",
                                  feedback="No.")).run(shard).to_pylist()
    for row in wrong:
        for traj, correct in zip(row["trajectories"], row["turn_correct"]):
            assert [m["role"] for m in traj] == ["user"] + ["assistant", "user"] * 3 + ["assistant"]
            assert [m["content"] for m in traj[2::2]] == ["No."] * 3 and correct == [False] * 4
    # a record's trajectories do not depend on its shard mates
    alone = Rollout(RolloutConfig(gen, samples=2, turns=4, verifier="tests.test_drift:never",
                                  feedback="No.")).run(_table(_records(3)[2:]))
    assert alone.column("trajectories").to_pylist()[0] == wrong[2]["trajectories"]


def test_recorded_alfworld_trajectories(real_data, tmp_path):
    raw = tmp_path / "alf"
    raw.mkdir()
    for d in ("D0", "D1"):
        src = real_data / "alfworld_knowagent_trajs" / f"KnowAgentALFWorld_llama-2-13b_{d}.even_tasks.jsonl"
        (raw / f"{d}.jsonl").write_text("\n".join(src.read_text().splitlines()[:12]) + "\n")
    out = tmp_path / "out"
    assert main(["drift", "--input", str(raw), "--out", str(out), "--verifier", "recorded", "--max-weight", "1.5"]) == 0
    rows, m = load(out), manifest(out)
    assert len(rows) == 24 and m["model"] is None and m["generation"] is None
    assert m["weights"]["groups"] == 12 and m["weights"]["clipped"] == sum(r["weight"] == 1.5 for r in rows) > 0
    for r in rows:
        assert r["return_outcome"] == r["reward"] == r["return"] and r["turns"] == 1 and r["sample_index"] == 0
        assert r["success"] == (r["reward"] == 1.0) and r["t_star"] == (1 if r["success"] else None)
        last = max(i for i, x in enumerate(r["messages"]) if x["role"] == "assistant")
        assert r["train_target"] == r["messages"][last]["content"] and r["train_context"] == r["messages"][:last]
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group_id"]].append(r)
    mixed = [g for g in by_group.values() if {x["success"] for x in g} == {True, False}]
    assert mixed and all(max(x["weight"] for x in g) == 1.5 for g in mixed)   # 2/(1+e^-10), clipped
    same = [g for g in by_group.values() if len({x["success"] for x in g}) == 1]
    assert same and all(x["weight"] == 1.0 and x["ess"] == 2.0 for g in same for x in g)


def test_bad_options_are_usage_errors(raw, tmp_path, capsys):
    assert main(["drift", "--input", str(raw), "--out", str(tmp_path / "o"), "--verifier", "regex"]) == 2
    assert "unknown verifier 'regex'" in capsys.readouterr().err
    assert main(["drift", "--input", str(raw), "--out", str(tmp_path / "o"), "--beta", "-1"]) == 2


def test_pipeline_file(raw, tmp_path, tiny_model_dir):
    out = tmp_path / "p"
    sets = [f"input=[{raw}]", f"out={out}", f"model={tiny_model_dir}", "samples=1", "turns=1",
            "max_new_tokens=3", "limit=2", "device=cpu"]
    assert main(["run", str(REPO / "pipelines" / "drift.yaml"), *[a for s in sets for a in ("--set", s)]]) == 0
    m = manifest(out)
    assert m["job"] == "drift" and m["counts"]["sft"] == 2 and m["config"]["beta"] == 0.1


def test_trl_weighted_sft_example_takes_one_step(hashed, tmp_path, tiny_model_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("drift_weighted_sft", REPO / "examples" / "drift_weighted_sft.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)

    # the loss: weight x token-mean NLL over labelled tokens, averaged over the batch
    logits, labels = torch.randn(2, 5, 7), torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    nll = torch.nn.functional.cross_entropy
    expected = (2.0 * nll(logits[0, 1:3], labels[0, 2:4]) + 0.5 * nll(logits[1, :4], labels[1, 1:])) / 2
    assert ex.weighted_nll(logits, labels, torch.tensor([2.0, 0.5])).item() == pytest.approx(expected.item(), rel=1e-6)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = ex.train(str(hashed), model, str(tmp_path / "ckpt"), max_steps=1, batch_size=4, use_cpu=True,
                       max_length=256, dataloader_num_workers=0)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["weight"].shape == (4,) and (batch["labels"] != -100).sum() < batch["attention_mask"].sum()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
