"""benchmarks/probe_bench.py on a tiny random Llama: the JSON contract and real exactness checks."""

import json
import sys

import pytest
import torch

from benchmarks.probe_bench import main, parse_args, run_benchmark
from tests.conftest import tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and a busy 2-core machine makes OpenMP barriers crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bench(*argv: str) -> dict:
    result = run_benchmark(tiny_llama(), parse_args(["--reps", "1", "--seq-len", "40", "--mixed", *argv]))
    json.dumps(result)  # the script prints it: everything must serialize
    return result


def test_fp32_probe_and_opacus_match_naive_norms():
    pytest.importorskip("opacus")
    r = bench("--examples", "3", "--ref-examples", "0")
    assert set(r) >= {"config", "machine", "memory_method", "methods", "ratios_tokens_per_s", "exactness"}
    for m in ("train_step", "probe", "naive", "opacus"):
        stats = r["methods"][m]
        assert stats["examples"] == 3 and stats["tokens"] == r["config"]["real_tokens"]
        assert stats["tokens_per_s"] > 0 and len(stats["seconds"]) == 1
        assert "peak_mem_mib" in stats
    assert r["config"]["padded_tokens"] > r["config"]["real_tokens"]  # --mixed really pads
    assert set(r["ratios_tokens_per_s"]) == {"probe/train_step", "probe/naive", "probe/opacus"}
    assert "probe_ref" not in r["methods"]  # ref examples are all examples: the probe run itself compares
    assert all(v > 0 for v in r["ratios_tokens_per_s"].values())
    assert r["exactness"]["probe_vs_naive_max_rel_err"] < 1e-4
    assert r["exactness"]["opacus_vs_naive_max_rel_err"] < 1e-4


def test_bf16_autocast_probe_agrees_with_fp32_naive_per_module():
    # several padded batches (batch-tokens 80 at seq-len <= 40), every module of every example within 2e-2
    r = bench("--examples", "5", "--ref-examples", "0", "--dtype", "bf16", "--batch-tokens", "80",
              "--skip", "opacus", "--seed", "1")
    assert len(r["config"]["batches"]) >= 2
    err = r["exactness"]["probe_vs_naive_max_rel_err"]
    assert 0 < err < 2e-2  # > 0: autocast really lowered precision


def test_cli_prints_one_json_object_and_caps_the_reference_methods(tiny_model_dir, capsys):
    assert main(["--model", tiny_model_dir, "--device", "cpu", "--examples", "3", "--seq-len", "16",
                 "--reps", "1", "--ref-examples", "1", "--skip", "opacus"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["config"]["model"] == tiny_model_dir
    assert r["methods"]["probe"]["examples"] == 3 and r["methods"]["probe"]["tokens"] == 48
    assert r["methods"]["naive"]["examples"] == 1 and r["methods"]["naive"]["tokens"] == 16
    assert r["methods"]["probe_ref"]["examples"] == 1 and r["methods"]["probe_ref"]["tokens"] == 16
    assert r["methods"]["opacus"] == {"skipped": True} and r["ratios_tokens_per_s"]["probe/opacus"] is None
    same = r["methods"]["probe_ref"]["tokens_per_s"] / r["methods"]["naive"]["tokens_per_s"]
    assert r["ratios_tokens_per_s_same_examples"]["probe/naive"] == pytest.approx(same)
    assert r["exactness"]["probe_vs_naive_max_rel_err"] < 1e-4
    assert r["exactness"]["opacus_vs_naive_max_rel_err"] is None


def test_an_opacus_failure_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ModuleNotFoundError
    r = bench("--examples", "2", "--seq-len", "16")
    assert r["methods"]["opacus"]["error"].startswith("ModuleNotFoundError")
    assert r["exactness"]["opacus_vs_naive_max_rel_err"] is None
    assert r["ratios_peak_mem"]["probe/opacus"] is None
    assert r["exactness"]["probe_vs_naive_max_rel_err"] < 1e-4


def test_opacus_on_every_example_is_compared_in_the_same_batches():
    pytest.importorskip("opacus")
    r = bench("--examples", "3", "--ref-examples", "1", "--opacus-examples", "all")
    m = r["methods"]
    assert m["opacus"]["examples"] == 3 and m["naive"]["examples"] == 1 and m["probe_ref"]["examples"] == 1
    assert r["examples_per_method"] == {"train_step": 3, "probe": 3, "naive": 1, "opacus": 3, "probe_ref": 1}
    same = r["ratios_tokens_per_s_same_examples"]
    assert same["probe/opacus"] == pytest.approx(m["probe"]["tokens_per_s"] / m["opacus"]["tokens_per_s"])
    assert same["probe/naive"] == pytest.approx(m["probe_ref"]["tokens_per_s"] / m["naive"]["tokens_per_s"])
    assert r["ratios_peak_mem"]["probe/opacus"] == pytest.approx(m["probe"]["peak_mem_mib"] / m["opacus"]["peak_mem_mib"])
    assert r["exactness"]["opacus_vs_naive_max_rel_err"] < 1e-4
