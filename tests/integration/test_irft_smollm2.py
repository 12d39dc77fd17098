"""`curate irft` with the embedded SmolLM2 on 4 Self-Instruct seed tasks and 4 HH-RLHF pairs (chosen as
the demonstration), then one TRL DPOTrainer step on the exported pairs, reading the precomputed reference
log-probs."""

import json

import pytest

from curate import logprobs, models
from curate.formats.export import export
from tests.integration.test_export_consumers import _dpo_step
from tests.test_irft import direct_logp, irft, load, records

pytestmark = pytest.mark.integration


def test_irft_on_real_data_then_dpo_step(tmp_path, real_data, tiny_model_dir):
    out = tmp_path / "irft"
    assert irft(records(tmp_path, real_data), out, "embedded", "--max-new-tokens", "24", "--stages", "1") == 0
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == 8 and c["pairs"] + c["identical"] == 8 and c["quarantined"] == 0
    assert m["win_rates"]["implicit_reward"]["pairs"] == c["pairs"] and m["model"]["name"] == models.EMBEDDED
    rows = load(out).to_pylist()
    assert {r["source"].rsplit("/", 1)[-1] for r in rows} == {"seed.jsonl", "hh.jsonl"}
    ref = models.resolve(None)
    tok, model = models.load_tokenizer(ref), models.load_model(ref)
    r = rows[0]
    for side in ("chosen", "rejected"):   # the real model: batched sums equal one example alone
        context, reply = logprobs.split_ids(tok, r["prompt"], r[side][0]["content"])
        assert r[f"ref_{side}_logps"] == pytest.approx(direct_logp(model, context, reply), abs=1e-3)
    hh = next(x for x in rows if x["source"].endswith("hh.jsonl"))
    assert len(hh["prompt"]) >= 1 and hh["prompt"][-1]["role"] == "user"

    export(out, "trl", tmp_path / "trl")
    logs = _dpo_step(tmp_path / "trl" / "pairs.arrow", tiny_model_dir, tmp_path / "dpo", beta=0.1)
    assert "rewards/chosen" in logs and logs["loss"] > 0
