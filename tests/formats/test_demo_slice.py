"""The demo slice in data/demo: it normalises cleanly, and the script regenerates it byte for byte."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from curate.formats.adapters import Normalized, iter_normalized, record_id
from curate.io.readers import list_input_files, read_records

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def results(path: Path) -> list[Normalized]:
    out = [r for _, _, r in iter_normalized(path, read_records(path))]
    assert all(isinstance(r, Normalized) for r in out), path
    return out


def test_demo_files_are_listed_without_their_docs():
    assert [p.name for p in list_input_files([DEMO])] == ["alfworld_knowagent.jsonl", "gsm8k_prompt_completion.jsonl"]


def test_demo_alfworld_slice():
    records = results(DEMO / "alfworld_knowagent.jsonl")
    assert len(records) == 40 and {r.format for r in records} == {"transcript"}
    assert sorted(r.reward for r in records) == [0.0] * 20 + [1.0] * 20


def test_demo_gsm8k_slice_matches_the_question_answer_source(data_dir):
    demo = results(DEMO / "gsm8k_prompt_completion.jsonl")
    source = results(data_dir / "gsm8k" / "train.lines1-2000.jsonl")[:40]
    assert {r.format for r in demo} == {"prompt_completion"}
    assert demo[0].ground_truth == "72"
    # same messages and the same "####" ground truth, so the same ids as the GSM8K originals
    assert [record_id(r) for r in demo] == [record_id(r) for r in source]


def test_script_regenerates_the_slice(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_demo_slice.py", "--shared", str(data_dir), "--out", str(tmp_path)])
    runpy.run_path(str(DEMO / "make_demo_slice.py"), run_name="__main__")
    for name in ("alfworld_knowagent.jsonl", "gsm8k_prompt_completion.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes()
    source = (data_dir / "alfworld_knowagent_trajs" / "KnowAgentALFWorld_llama-2-13b_D0.even_tasks.jsonl").read_bytes()
    lines = (DEMO / "alfworld_knowagent.jsonl").read_bytes().splitlines(keepends=True)
    positions = [source.index(line) for line in lines]  # whole source lines, in source order
    assert positions == sorted(positions)
    assert all(p == 0 or source[p - 1:p] == b"\n" for p in positions)
