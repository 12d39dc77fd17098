"""`curate prism` with the real embedded SmolLM2-135M-Instruct on 16 real records."""

import json

import datasets
import numpy as np
import polars as pl
import pytest
import torch

from curate import chat, models
from curate.cli import main
from tests.test_gradients import naive_norms

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    repo_demo = __import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "demo"
    raw = tmp_path_factory.mktemp("raw")
    for name in ("gsm8k_prompt_completion.jsonl", "alfworld_knowagent.jsonl"):
        lines = (repo_demo / name).read_text().splitlines()
        (raw / name).write_text("\n".join(lines[:8]) + "\n")
    out = tmp_path_factory.mktemp("out") / "routed"
    args = ["prism", "--input", str(raw), "--out", str(out), "--max-length", "320", "--shard-size", "8"]
    assert main(args) == 0
    return out, args


def test_shards_load_in_datasets_and_polars(routed):
    out, _ = routed
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["input"] == 16 and c["sft"] + c["rl"] + c["quarantined"] + c["duplicates"] == 16
    assert c["sft"] == c["rl"] == 8
    assert len(manifest["modules"]) == 210 and manifest["modules"][0] == "model.layers.0.self_attn.q_proj"
    assert manifest["model"]["name"].startswith("embedded:SmolLM2-135M-Instruct")
    for part in ("sft", "rl"):
        files = sorted(str(p) for p in (out / part).glob("*.arrow"))
        ds = datasets.load_dataset("arrow", data_files=files, split="train")
        assert len(ds) == 8 and all(len(g) == 210 for g in ds["grad_norms"])
        assert ds[0]["messages"][-1]["role"] in ("assistant", "user")
        df = pl.read_ipc_stream(files[0]) if len(files) == 1 else pl.concat([pl.read_ipc_stream(f) for f in files])
        assert df.height == 8 and (df["route"] == part).all()
        assert np.isfinite(df["probe_loss"].to_numpy()).all() and (df["grad_norm_total"] > 0).all()


def test_real_model_norms_match_naive_autograd(routed):
    """Against one-example fp32 autograd on the weights, the issue's reference computation."""
    out, _ = routed
    row = pl.read_ipc_stream(next((out / "sft").glob("*.arrow"))).sort("n_tokens").row(0, named=True)
    ref = models.resolve(None)
    enc = chat.encode(models.load_tokenizer(ref), row["messages"], 320)
    loss, norms = naive_norms(models.load_model(ref, "cpu"), enc.input_ids, enc.loss_mask)
    assert row["probe_loss"] == pytest.approx(loss, rel=1e-4)
    torch.testing.assert_close(torch.tensor(row["grad_norms"], dtype=torch.float64), norms, rtol=1e-4, atol=1e-9)


def test_second_run_is_a_cache_hit(routed):
    out, args = routed
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.glob("[sr]*/*.arrow")}
    assert main(args) == 0
    cache = json.loads((out / "manifest.json").read_text())["cache"]
    assert cache["probe"] == {"computed": 0, "cached": 2} and cache["ingest"]["computed"] == 0
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.glob("[sr]*/*.arrow")} == before
