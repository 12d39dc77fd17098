"""`curate prism` with the real embedded SmolLM2-135M-Instruct on 4 τ-bench airline trajectories (OpenAI
tool calls, tool results, the tool schemas from --tools)."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curate import chat, models
from curate.cli import main
from curate.messages import parse_tools
from tests.test_gradients import naive_norms

pytestmark = pytest.mark.integration

TOOLS_DATA = Path(__file__).resolve().parents[1] / "data" / "tools"


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    raw = tmp_path_factory.mktemp("tau")
    lines = (TOOLS_DATA / "tau_bench_airline.lines1-12.jsonl").read_text().splitlines()
    (raw / "tau.jsonl").write_text("\n".join(lines[:4]) + "\n")
    out = tmp_path_factory.mktemp("out") / "routed"
    assert main(["prism", "--input", str(raw), "--tools", str(TOOLS_DATA / "airline_tools.json"),
                 "--out", str(out), "--max-length", "384", "--shard-size", "4"]) == 0
    return out


def test_four_trajectories_routed_with_their_tools(routed):
    m = json.loads((routed / "manifest.json").read_text())
    assert m["counts"]["input"] == 4 and m["counts"]["quarantined"] == 0
    assert m["counts"]["sft"] == m["counts"]["rl"] == 2
    assert m["chat_template"]["tool_rendering"] == {"text": 4}  # SmolLM2's template ignores tools
    df = pl.concat([pl.read_ipc_stream(f) for f in sorted(routed.glob("[sr]*/*.arrow"))])
    assert df.height == 4 and df["tools"].is_not_null().all()
    assert np.isfinite(df["probe_loss"].to_numpy()).all() and (df["grad_norm_total"] > 0).all()
    calls = [m for msgs in df["messages"].to_list() for m in msgs if m["tool_calls"]]
    assert calls and all(c["function"]["arguments"].startswith("{") for m in calls for c in m["tool_calls"])


def test_norms_match_naive_autograd_on_the_rendered_tool_conversation(routed):
    row = pl.concat([pl.read_ipc_stream(f) for f in sorted(routed.glob("[sr]*/*.arrow"))]).row(0, named=True)
    ref = models.resolve(None)
    enc = chat.encode(models.load_tokenizer(ref), row["messages"], 384, tools=parse_tools(row["tools"]))
    assert enc.input_ids and sum(enc.loss_mask[1:]) == row["n_loss_tokens"]   # the first token is no target
    loss, norms = naive_norms(models.load_model(ref, "cpu"), enc.input_ids, enc.loss_mask)
    assert row["probe_loss"] == pytest.approx(loss, rel=1e-4)
    torch.testing.assert_close(torch.tensor(row["grad_norms"], dtype=torch.float64), norms, rtol=1e-4, atol=1e-9)
