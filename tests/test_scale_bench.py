"""benchmarks/scale_bench.py still measures a real run: a small size, in-process and with helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale_bench  # noqa: E402

from curate.ingest import ingest  # noqa: E402
from curate.ingest.pool import usable_cpus  # noqa: E402


@pytest.mark.parametrize("helpers_from_bytes", [1 << 40, 0], ids=["in-process", "helpers"])
def test_scale_bench_counts_reconcile_with_what_it_wrote(monkeypatch, helpers_from_bytes):
    monkeypatch.setattr(ingest, "HELPERS_MIN_BYTES", helpers_from_bytes)
    r = scale_bench.one_size(1500, shard_size=128, n_modules=12)
    c, kinds = r["counts"], r["kinds"]
    assert c["input"] == 1500 == sum(kinds.values())
    assert c["duplicates"] == kinds["duplicate"] and c["quarantined"] == kinds["bad"]
    assert c["sft"] + c["rl"] == kinds["prompt_completion"] + kinds["messages"]
    assert abs(c["sft"] - c["rl"]) <= 1  # the median split
    assert r["shards"] == -(-(c["sft"] + c["rl"]) // 128)
    cpus = usable_cpus()
    assert r["parse_helpers"] == (cpus if cpus > 1 and helpers_from_bytes == 0 else 0)
    assert r["records_per_s"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"]
