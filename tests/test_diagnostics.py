"""Routing diagnostics and controls on a constructed cache: scores that are functions of length and of
the source, every number recomputed here with numpy/scipy from the written shard columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from curate import concentration
from curate.config import PrismConfig
from curate.corpus import diagnostics
from curate.corpus.route import RouteConfig, norm_metric_columns
from curate.engine.shards import run_ingest
from curate.io.atomic import read_arrow, write_arrow
from curate.jobs.prism import write_routed

N_MODULES = 6
MODULES = [f"model.layers.{layer}.self_attn.{m}_proj" for layer in range(2) for m in "qkv"]
PROBE_MAP = {"model_class": "Toy", "roles": ["q", "k", "v"] * 2,
             "layers": [{"layer": layer, "roles": {m: f"model.layers.{layer}.self_attn.{m}_proj" for m in "qkv"}}
                        for layer in range(2)],
             "numel": [64, 16, 16, 64, 16, 16], "partial": False, "unprobed": []}


def length_of(source: str, i: int) -> int:
    """Source a: short rows (20..119 loss tokens), b: long ones (400..499)."""
    return (20 if source == "a" else 400) + (i * 37) % 100


def norms_of(source: str, i: int, length: int) -> list[float]:
    rng = np.random.default_rng([ord(source), i])
    return list(rng.gamma(2.0, 1.0, N_MODULES).astype(np.float32))


def build(tmp_path: Path, n: int = 60, gini=None) -> dict:
    """A prism work cache for 2n records (n per source) whose probe columns are constructed:
    `gini(source, i, length)` sets the stored gini column (default: the norms' own)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for source in ("a", "b"):
        lines = [json.dumps({"messages": [{"role": "user", "content": f"{source} question {i}"},
                                          {"role": "assistant", "content": f"answer {i}"}]}) for i in range(n)]
        (raw / f"{source}.jsonl").write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    cfg = PrismConfig(input=[str(raw)], out=str(tmp_path / "out"), shard_size=25)
    ing, _ = run_ingest(cfg, work / "ingest")
    tok, prb = [], []
    for k, shard in enumerate(ing["shards"]):
        records = read_arrow(shard["path"], ["source", "source_index"]).to_pylist()
        src = [Path(r["source"]).stem for r in records]
        idx = [r["source_index"] for r in records]
        lengths = np.array([length_of(s, i) for s, i in zip(src, idx)])
        norms = np.array([norms_of(s, i, L) for s, i, L in zip(src, idx, lengths)], np.float32)
        grad_norms = pa.array(list(norms), pa.list_(pa.float32()))
        metrics = norm_metric_columns(grad_norms)
        if gini is not None:
            metrics["gini"] = pa.array([gini(s, i, L) for s, i, L in zip(src, idx, lengths)], pa.float32())
        rows = len(records)
        tokens = pa.table({"n_tokens": lengths + 10, "n_loss_tokens": lengths,
                           "truncated": [bool(L > 480) for L in lengths], "token_error": pa.nulls(rows, pa.string())})
        probe = pa.table({"probe_loss": np.linspace(1, 2, rows).astype(np.float32), "grad_norms": grad_norms,
                          "grad_norm_total": np.linalg.norm(norms, axis=1).astype(np.float32), **metrics})
        for folder, table, out in (("tokenize", tokens, tok), ("probe", probe, prb)):
            path = work / folder / f"part-{k:05d}.arrow"
            out.append({"path": str(path), "sha256": write_arrow(path, table), "rows": rows})
    return {"config": {"prefix": "none"}, "ingest": ing, "tokenize": tok, "probe": prb, "signals": {},
            "model": {"name": "toy"}, "modules": MODULES, "probe_map": PROBE_MAP, "timings": {}, "cache": {}}


def route(state: dict, out: Path, **options) -> tuple[dict, pa.Table]:
    manifest = write_routed(state, RouteConfig(**options), out)
    parts = [read_arrow(f) for p in ("sft", "rl") for f in sorted((out / p).glob("*.arrow"))]
    return manifest, pa.concat_tables(parts).sort_by([("source", "ascending"), ("source_index", "ascending")])


def column(rows: pa.Table, name: str) -> np.ndarray:
    return rows.column(name).to_numpy()


def by_length(source, i, length):  # a score that is a function of length
    return 0.1 + 0.05 * np.log(length)


def test_a_score_that_follows_length_and_source_is_called_out(tmp_path):
    manifest, rows = route(build(tmp_path, gini=by_length), tmp_path / "out")
    d = manifest["diagnostics"]
    rho = stats.spearmanr(column(rows, "score"), column(rows, "n_loss_tokens")).statistic
    assert d["spearman"]["overall"]["n_loss_tokens"] == pytest.approx(rho, abs=1e-4) and rho > 0.99
    assert any("follows length" in w for w in d["warnings"])
    assert any("split follows the source" in w for w in d["warnings"])   # a is short -> sft, b long -> rl
    sources = [Path(s).stem for s in rows.column("source").to_pylist()]
    rl = column(rows, "route") == "rl"
    for name, split in d["splits"]["by_source"].items():
        mine = np.array([s == Path(name).stem for s in sources])
        assert split == {"rows": int(mine.sum()), "sft": int((mine & ~rl).sum()), "rl": int((mine & rl).sum()),
                         "rl_share": round(float((mine & rl).mean() / mine.mean()), 4)}
    trunc = column(rows, "truncated")
    assert d["truncated"] == {"sft": int((trunc & ~rl).sum()), "rl": int((trunc & rl).sum())}


def test_stratify_source_splits_every_source_at_its_own_median(tmp_path):
    manifest, rows = route(build(tmp_path, n=61, gini=by_length), tmp_path / "out", stratify="source")
    rl = column(rows, "route") == "rl"
    score, threshold = column(rows, "score"), column(rows, "threshold")
    for name in manifest["routing"]["thresholds"]:
        mine = np.array([s == name for s in rows.column("source").to_pylist()])
        ranked = np.sort(score[mine])
        expected = ranked[int(np.ceil(0.5 * mine.sum())) - 1]   # the inverted-CDF median of the source
        assert manifest["routing"]["thresholds"][name] == pytest.approx(expected) and np.all(threshold[mine] == expected)
        assert (int((mine & ~rl).sum()), int((mine & rl).sum())) == (31, 30)   # 61 distinct scores each
    assert manifest["routing"]["threshold"] is None
    assert not any("split follows the source" in w for w in manifest["diagnostics"]["warnings"])


def alternating(source, i, length):
    """0.1 + 0.05 ln L, plus +-0.002 alternating with i: a length trend and a signal length does not explain."""
    return 0.1 + 0.05 * np.log(length) + (0.002 if i % 2 else -0.002)


def test_control_length_removes_the_length_trend(tmp_path):
    state = build(tmp_path, gini=alternating)
    plain, _ = route(state, tmp_path / "plain")
    assert abs(plain["diagnostics"]["spearman"]["overall"]["n_loss_tokens"]) > 0.9
    manifest, rows = route(state, tmp_path / "out", control="length")
    fit = manifest["routing"]["length_fit"]
    lengths = column(rows, "n_loss_tokens").astype(np.float64)
    gini = column(rows, "gini").astype(np.float64)
    ts = stats.theilslopes(gini, np.log(lengths))   # every row: fewer than FIT_ROWS
    assert fit["slope"] == pytest.approx(ts.slope) and fit["intercept"] == pytest.approx(ts.intercept)
    residual = gini - (ts.intercept + ts.slope * np.log(lengths))
    assert np.allclose(column(rows, "score"), residual, atol=1e-6)
    rho = stats.spearmanr(column(rows, "score"), lengths).statistic
    assert abs(rho) < 0.05 and manifest["diagnostics"]["spearman"]["overall"]["n_loss_tokens"] == pytest.approx(rho, abs=1e-4)
    assert not any("follows length" in w for w in manifest["diagnostics"]["warnings"])


def test_bootstrap_is_seeded_and_route_confidence_is_the_share_of_resamples(tmp_path):
    state = build(tmp_path)
    first, rows = route(state, tmp_path / "one", bootstrap=50, seed=3)
    again, rows2 = route(state, tmp_path / "two", bootstrap=50, seed=3)
    other, rows3 = route(state, tmp_path / "three", bootstrap=50, seed=4)
    conf = column(rows, "route_confidence")
    assert first["diagnostics"]["threshold"] == again["diagnostics"]["threshold"]
    assert np.array_equal(conf, column(rows2, "route_confidence"))
    assert first["diagnostics"]["threshold"] != other["diagnostics"]["threshold"]
    # independently: resample the corpus scores with the same generator and count kept routes
    by_order = pa.concat_tables([read_arrow(f) for p in ("sft", "rl") for f in sorted((tmp_path / "one" / p).glob("*"))])
    score = column(rows, "score")
    rng = np.random.default_rng([3, 0])
    ordered = np.concatenate([read_arrow(p["path"], ["gini"]).column("gini").to_numpy() for p in state["probe"]])
    boot = np.array([np.quantile(ordered[rng.integers(0, len(ordered), len(ordered))], 0.5, method="inverted_cdf")
                     for _ in range(50)])
    t = first["routing"]["threshold"]
    expected = np.array([np.mean((s <= boot) == (s <= t)) for s in score], np.float32)
    assert np.allclose(conf, expected) and by_order.num_rows == len(score)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert first["diagnostics"]["threshold"]["groups"]["all"]["interval"] == pytest.approx([lo, hi])
    fixed, rows4 = route(state, tmp_path / "fixed", threshold=0.3)
    assert rows4.column("route_confidence").null_count == rows4.num_rows


def test_agreement_spearman_and_top_modules_recomputed(tmp_path):
    manifest, rows = route(build(tmp_path), tmp_path / "out")
    d = manifest["diagnostics"]
    metrics = {m: column(rows, m) for m in ("gini", "cv", "kurtosis", "magnitude", "random")}
    median = {m: v > np.quantile(v, 0.5, method="inverted_cdf") for m, v in metrics.items()}
    for a in metrics:
        for b in metrics:
            assert d["agreement"][a][b] == pytest.approx(np.mean(median[a] == median[b]), abs=1e-4)
    for cov in diagnostics.COVARIATES:
        assert d["spearman"]["overall"][cov] == pytest.approx(
            stats.spearmanr(column(rows, "score"), column(rows, cov)).statistic, abs=1e-4)
    norms = np.array(rows.column("grad_norms").to_pylist(), np.float64)
    share = norms ** 2 / (norms ** 2).sum(axis=1, keepdims=True)
    for row, s in zip(rows.column("top_modules").to_pylist(), share):
        order = np.argsort(-s, kind="stable")[:5]
        assert [t["module"] for t in row] == [MODULES[j] for j in order]
        assert [t["layer"] for t in row] == [j // 3 for j in order] and [t["role"] for t in row] == ["qkv"[j % 3] for j in order]
        assert np.allclose([t["share"] for t in row], s[order], atol=1e-6)


def test_module_scale_numel_divides_each_norm_before_the_metric(tmp_path):
    manifest, rows = route(build(tmp_path), tmp_path / "out", module_scale="numel")
    assert manifest["routing"]["module_scale"] == "numel"
    norms = np.array(rows.column("grad_norms").to_pylist(), np.float32) / np.sqrt(np.array(PROBE_MAP["numel"], np.float32))
    # Gini in the sorted form (Hurley & Rickard 2009), computed here without curate's helper
    x = np.sort(norms.astype(np.float64), axis=1)
    n = x.shape[1]
    k = np.arange(1, n + 1)
    gini = 1 - 2 * np.sum((x / x.sum(axis=1, keepdims=True)) * ((n - k + 0.5) / n), axis=1)
    assert np.allclose(column(rows, "gini"), gini, atol=1e-5) and np.array_equal(column(rows, "score"), column(rows, "gini"))
    assert not np.allclose(column(rows, "gini"), concentration.gini(np.array(rows.column("grad_norms").to_pylist())), atol=1e-3)


def test_warnings_do_not_cry_wolf(tmp_path):
    """A split the sources do not explain (a random metric at an unbalanced quantile), a split already
    stratified by source, small sources and an applied control: no warning that says otherwise."""
    state = build(tmp_path, gini=alternating)
    unbalanced, _ = route(state, tmp_path / "random", metric="random", quantile=0.85)
    assert unbalanced["diagnostics"]["source_dependence"]["lift"] < 0.5
    assert not any("follows the source" in w for w in unbalanced["diagnostics"]["warnings"])
    stratified, _ = route(state, tmp_path / "strat", stratify="source")
    assert not any("follows the source" in w for w in stratified["diagnostics"]["warnings"])
    controlled, _ = route(state, tmp_path / "ctl", control="length", stratify="source")
    assert not any("--control length`" in w for w in controlled["diagnostics"]["warnings"])


def test_a_group_that_cannot_be_split_and_an_empty_partition_are_named(tmp_path):
    state = build(tmp_path, n=1)   # one record per source
    manifest, rows = route(state, tmp_path / "out", stratify="source")
    warnings = manifest["diagnostics"]["warnings"]
    assert any("2 source group(s) went whole to one partition" in w for w in warnings)
    assert any("every routed row went to sft" in w for w in warnings) and rows.num_rows == 2


def test_bad_routing_options_are_refused_by_name():
    with pytest.raises(ValueError, match="--seed must be >= 0"):
        RouteConfig(seed=-1)
    with pytest.raises(ValueError, match="cannot be combined with --stratify"):
        RouteConfig(threshold=0.3, stratify="source")
    with pytest.raises(ValueError, match="--seed must be >= 0"):
        PrismConfig(input=["x"], seed=-1)


def test_the_first_token_is_never_a_target():
    from curate.chat import Encoded

    assert Encoded([5, 6, 7], [1, 0, 0], True).n_loss_tokens == 0   # quarantined by tokenize, not probed as 0
    assert Encoded([5, 6, 7], [1, 1, 1], True).n_loss_tokens == 2
