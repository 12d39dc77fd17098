"""`curate drift` with the real embedded SmolLM2-135M-Instruct on 3 GSM8K prompts (K=2, T=2)."""

import json
import math
from collections import defaultdict

import pyarrow as pa
import pytest

from curate.cli import main
from curate.io.atomic import read_arrow
from curate.stages.configs import DEFAULT_FEEDBACK
from curate.verifiers import verify_math

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_data):
    raw = tmp_path_factory.mktemp("raw") / "gsm8k.jsonl"
    raw.write_text("\n".join((real_data / "gsm8k" / "test.lines1-300.jsonl").read_text().splitlines()[:3]) + "\n")
    out = tmp_path_factory.mktemp("out") / "drift"
    assert main(["drift", "--input", str(raw), "--out", str(out), "--samples", "2", "--turns", "2",
                 "--max-new-tokens", "16", "--device", "cpu"]) == 0
    rows = pa.concat_tables([read_arrow(f) for f in sorted((out / "sft").glob("*.arrow"))]).to_pylist()
    return rows, json.loads((out / "manifest.json").read_text())


def test_multi_turn_structure(run):
    rows, manifest = run
    assert len(rows) == 6 and manifest["counts"]["prompts"] == 3
    assert manifest["model"]["name"].startswith("embedded:SmolLM2-135M-Instruct")
    assert any(any(ch.isdigit() for ch in r["train_target"]) for r in rows)   # a real model writes numbers
    for r in rows:
        record = {"ground_truth": r["ground_truth"]}
        msgs = r["messages"]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        feedback = [m for m in msgs[len(r["prompt"]):] if m["role"] == "user"]
        assert len(answers) == r["turns"] and len(feedback) == r["turns"] - 1
        assert all(m["content"] == DEFAULT_FEEDBACK for m in feedback)
        assert not any(verify_math(record, a).correct for a in answers[:-1])   # feedback only after failures
        final = verify_math(record, answers[-1]).correct
        assert r["success"] == final and (final or r["turns"] == 2)
        assert r["t_star"] == (r["turns"] if final else None)
        assert r["return_outcome"] == (0.9 ** (r["turns"] - 1) if final else 0.0)
        assert r["return_format"] == pytest.approx(-0.1 * sum(verify_math(record, a).answer is None for a in answers))


def test_weights_follow_from_returns(run):
    rows, manifest = run
    groups = defaultdict(list)
    for r in rows:
        groups[r["group_id"]].append(r)
    assert len(groups) == 3
    for members in groups.values():
        z = [math.exp(m["return"] / 0.1) for m in members]
        for m, zi in zip(members, z):
            assert m["weight"] == pytest.approx(zi * len(z) / sum(z), rel=1e-9)
        assert sum(m["weight"] for m in members) == pytest.approx(len(members))
    assert manifest["weights"]["ess"] == pytest.approx(sum(r["weight"] for r in rows) ** 2 /
                                                       sum(r["weight"] ** 2 for r in rows))
