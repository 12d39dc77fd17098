"""benchmarks/gpu_check.py on CPU (tiny shapes): the device check runs end to end in CI, so it cannot rot
before a GPU runs it; its numbers here are checked like the GPU's."""

import json

import pytest
import torch

from benchmarks.gpu_check import SECTIONS, dumps, main


# No torch.set_num_threads here: switching the thread count and back leaves this process summing some
# float32 reductions in another order than a fresh one, and test_pipeline compares in-process output
# with fresh dask workers' byte for byte.


def test_cpu_run_prints_one_json_object_with_every_section(tmp_path, capsys):
    assert main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == printed
    s = printed["sections"]
    assert set(s) == set(SECTIONS)
    assert not [k for k, v in s.items() if "error" in v or "skipped" in v]

    assert s["ceilings"]["matmul_tflops"] > 0 and s["ceilings"]["copy_gb_per_s"] > 0
    # the norm step on fp32 CPU inputs agrees with fp64; both forms were timed for every case
    assert s["norm_step"]["max_rel_err"]["norms_vs_fp64_same_inputs"] < 1e-5
    assert all(r["ms_gram"] > 0 and r["ms_product"] > 0 for r in s["norm_step"]["forms"])
    for model in s["exactness"]["models"].values():
        assert model["probe_fp32_vs_naive_fp32"] < 1e-5
        assert 0 < model["probe_bf16_vs_naive_fp32"] < 2e-2
    (case,) = [v for k, v in s["speed"].items() if "@T=" in k]
    assert {"train_step", "probe", "naive", "opacus"} <= set(case["methods"])
    assert case["methods"]["probe"]["tokens_per_s"] > 0
    assert s["small_t"]["methods"]["probe"]["tokens_per_s"] > 0
    # curate prism really ran on the random-weight model, in process and on a one-worker dask cluster
    runs = s["end_to_end"]
    for key in ("workers_0", "workers_0_again", "workers_1"):
        assert runs[key]["rc"] == 0, runs[key]
        assert runs[key]["rows"]["input"] == 16 and runs[key]["rows"]["sft"] + runs[key]["rows"]["rl"] == 16
        assert runs[key]["strict_deterministic"] is None  # CPU: deterministic algorithms are never turned on
    assert runs["same_bytes_on_rerun"] and runs["same_bytes_on_a_worker"]  # CPU: bitwise reproducible
    p = s["profile"]
    assert p["ms"]["probe"] > 0 and p["ms"]["frozen_backward"] > 0 and p["top_ops_by_device_time"]
    assert p["ms"]["probe_warn_only"] > 0 and p["strict_deterministic"] is None
    assert printed["summary"]


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_non_finite_numbers_are_written_as_null():
    assert json.loads(dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})) == \
        {"a": None, "b": [None, 1.5], "c": {"d": None}}
