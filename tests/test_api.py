"""The Python API as a notebook uses it: data in memory in, a DatasetDict-like Result out, equal to what
the command line writes for the same input."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import curate
from curate.cli import main
from curate.io.atomic import read_arrow
from tests.conftest import REPO

OPTIONS = {"max_length": 256, "batch_tokens": 2048, "shard_size": 4}
FLAGS = ["--max-length", "256", "--batch-tokens", "2048", "--shard-size", "4"]


def demo_rows(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / "demo" / name).read_text().splitlines()[:n]]


def shard_bytes(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("[sr][fl]*/*.arrow"))}


@pytest.fixture(scope="module")
def gsm8k():
    return demo_rows("gsm8k_prompt_completion.jsonl", 10)


@pytest.fixture(scope="module")
def api_run(gsm8k, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "routed"
    return curate.prism(datasets.Dataset.from_list(gsm8k), out, model=tiny_model_dir, **OPTIONS)


def test_a_dataset_in_gives_the_clis_shards_byte_for_byte(api_run, gsm8k, tiny_model_dir, tmp_path):
    assert isinstance(api_run, datasets.DatasetDict) and set(api_run) == {"sft", "rl"}
    assert api_run["sft"].num_rows + api_run["rl"].num_rows == 10
    assert isinstance(api_run["rl"], datasets.Dataset) and api_run.manifest["counts"]["input"] == 10
    # the command line on the file the API wrote: the same shards, byte for byte
    written = api_run.manifest["inputs"][0]["path"]
    assert main(["prism", "--input", written, "--out", str(tmp_path / "cli"), "--model", tiny_model_dir, *FLAGS]) == 0
    assert shard_bytes(tmp_path / "cli") == shard_bytes(api_run.out)
    # the rows the Result holds are the written shards' rows
    for part in ("sft", "rl"):
        files = sorted((api_run.out / part).glob("*.arrow"))
        assert api_run[part].data.table.equals(pa.concat_tables([read_arrow(f) for f in files]))
    # and a JSON-lines file of the same rows routes every row alike (only `source` names another file)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k))
    assert main(["prism", "--input", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "jsonl"),
                 "--model", tiny_model_dir, *FLAGS]) == 0
    by_id = {r["id"]: r for part in ("sft", "rl") for r in curate.load(tmp_path / "jsonl")[part].to_list()}
    for part in ("sft", "rl"):
        for row in api_run[part].to_list():
            other = by_id[row["id"]]
            assert {k: v for k, v in row.items() if k != "source"} == {k: v for k, v in other.items() if k != "source"}


def test_a_rerun_computes_nothing_and_frames_and_lists_are_inputs_too(api_run, gsm8k, tiny_model_dir, tmp_path):
    again = curate.prism(datasets.Dataset.from_list(gsm8k), api_run.out, model=tiny_model_dir, **OPTIONS)
    assert again.manifest["cache"]["probe"]["computed"] == 0 and shard_bytes(again.out) == shard_bytes(api_run.out)
    ids = sorted(r["id"] for part in ("sft", "rl") for r in api_run[part].to_list())
    for data in (pd.DataFrame(gsm8k), pl.DataFrame(gsm8k), gsm8k):
        res = curate.prism(data, tmp_path / type(data).__name__, model=tiny_model_dir, **OPTIONS)
        assert sorted(r["id"] for part in ("sft", "rl") for r in res[part].to_list()) == ids


def test_a_datasetdict_needs_a_split_it_has(gsm8k, tiny_model_dir, tmp_path):
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(gsm8k[:4])})
    with pytest.raises(ValueError, match="no split 'train'; its splits: test"):
        curate.prism(dd, tmp_path / "x", model=tiny_model_dir, **OPTIONS)
    res = curate.prism(dd, tmp_path / "y", split="test", model=tiny_model_dir, **OPTIONS)
    assert res["sft"].num_rows + res["rl"].num_rows == 4
    with pytest.raises(TypeError, match="cannot read int as input"):
        curate.prism(3, tmp_path / "z")


def test_mixed_agent_and_math_rows_and_score(tiny_model_dir, tmp_path):
    rows = demo_rows("alfworld_knowagent.jsonl", 3) + demo_rows("gsm8k_prompt_completion.jsonl", 3)
    res = curate.prism(rows, tmp_path / "mixed", model=tiny_model_dir, **OPTIONS)
    routed = {r["id"]: r for part in ("sft", "rl") for r in res[part].to_list()}
    assert len(routed) == 6 and {r["format"] for r in routed.values()} == {"transcript", "prompt_completion"}
    scores = curate.score(rows, tmp_path / "score", model=tiny_model_dir, **OPTIONS)
    assert isinstance(scores, datasets.Dataset) and scores.num_rows == 6
    assert not (tmp_path / "score" / "out").exists()   # nothing routed or written but the cache
    for row in scores.to_list():
        r = routed[row["id"]]
        assert row["probe_loss"] == r["probe_loss"] and row["grad_norms"] == r["grad_norms"]
        assert all(row[m] == r[m] for m in ("gini", "cv", "kurtosis", "magnitude", "random"))
