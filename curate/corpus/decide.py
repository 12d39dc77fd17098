"""The routing decision over the whole corpus, with its diagnostics (corpus.diagnostics).

From pass 1's per-row values (corpus.routing.ShardFeatures), in this order:
1. the routing value: the --metric column, or with `--control length` its residual after the length fit;
2. the strata (`--stratify source|format`: one threshold per group; none: one for the corpus) and each
   stratum's threshold: the fixed --threshold, or the inverted-CDF --quantile of the stratum's values;
3. the route: value <= threshold -> sft, else rl (swapped by --reverse);
4. the seeded bootstrap of each estimated threshold: its interval and each row's route_confidence;
5. the diagnostics and their warnings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from curate import schema
from curate.corpus import diagnostics as D
from curate.corpus.route import RouteConfig, assign, corpus_threshold
from curate.corpus.routing import ShardFeatures


@dataclass
class Decision:
    """Per work shard, the decision columns of its routable rows (metrics, score, threshold, route,
    route_confidence: one value per row); the manifest's `routing` block and its `diagnostics`."""

    per_shard: list[dict[str, np.ndarray]]
    routing: dict
    diagnostics: dict


def _groups(parts: list[tuple[list[str], np.ndarray]]) -> D.Groups:
    """One Groups over the corpus from each shard's (labels, indices): each shard's codes mapped to the
    corpus's sorted labels, without a Python string per row."""
    names = sorted({label for labels, _ in parts for label in labels})
    code = {name: i for i, name in enumerate(names)}
    codes = [np.array([code[label] for label in labels], dtype=np.int32)[index] if len(index) else
             np.zeros(0, np.int32) for labels, index in parts]
    return D.Groups(np.concatenate(codes) if codes else np.zeros(0, np.int32), names)


def decide(shards: list[ShardFeatures], cfg: RouteConfig) -> Decision:
    """Route every row of `shards` (pass 1's values, shard order) by `cfg`; see the module docstring."""
    n = sum(len(s) for s in shards)
    metrics = {m: np.concatenate([s.metrics[m] for s in shards]) if shards else np.zeros(0, np.float32)
               for m in schema.METRICS}
    covariates = {c: np.concatenate([s.covariates[c] for s in shards]) if shards else np.zeros(0)
                  for c in D.COVARIATES}
    truncated = np.concatenate([s.truncated for s in shards]) if shards else np.zeros(0, bool)
    sources, formats = _groups([s.source for s in shards]), _groups([s.format for s in shards])

    score, fit = metrics[cfg.metric], None
    if cfg.control == "length" and n:
        score, fit = D.length_residuals(score, covariates["n_loss_tokens"], cfg.seed)
    strata = {"none": D.Groups.one(n), "source": sources, "format": formats}[cfg.stratify]
    threshold = np.full(n, np.nan)
    confidence = np.full(n, np.nan, np.float32)
    groups = {}
    for g, (name, rows) in enumerate(strata.members()):
        t = corpus_threshold(score[rows], cfg)
        threshold[rows] = t
        groups[name] = {"threshold": t, "rows": int(rows.size), "interval": None, "std": None}
        if cfg.threshold is None and cfg.bootstrap:
            replicates = D.bootstrap_thresholds(score[rows], cfg.quantile, cfg.bootstrap, [cfg.seed, g])
            confidence[rows] = D.confidence(score[rows], t, replicates)
            groups[name].update(D.interval(replicates))
    route = assign(score, threshold, cfg.reverse)

    offsets = np.cumsum([0] + [len(s) for s in shards])
    columns = {**metrics, "score": score, "threshold": threshold, "route": route}
    if cfg.threshold is None and cfg.bootstrap:  # else route_confidence stays null
        columns["route_confidence"] = confidence
    per_shard = [{k: v[a:b] for k, v in columns.items()} for a, b in zip(offsets[:-1], offsets[1:])]
    stratified = cfg.stratify != "none"
    if stratified:
        single = None
    elif groups:
        single = float(groups["all"]["threshold"])
    else:  # nothing to route: the fixed threshold, or none
        single = cfg.threshold
    routing = {**asdict(cfg), "threshold": single,
               "thresholds": {k: g["threshold"] for k, g in groups.items()} if stratified else None,
               "length_fit": fit,
               "rule": "score <= threshold -> sft" + (" (reversed: -> rl)" if cfg.reverse else "")
                       + (f" within each {cfg.stratify}" if stratified else "")}
    diag = diagnose(score, metrics, covariates, truncated, route == "rl", sources, formats)
    diag["stratify"], diag["control"] = cfg.stratify, cfg.control
    diag["threshold"] = {"bootstrap": cfg.bootstrap if cfg.threshold is None else 0, "groups": groups}
    diag["warnings"] = D.warnings(diag) if n else []
    return Decision(per_shard, routing, diag)


def diagnose(score: np.ndarray, metrics: dict[str, np.ndarray], covariates: dict[str, np.ndarray],
             truncated: np.ndarray, rl: np.ndarray, sources: D.Groups, formats: D.Groups) -> dict:
    """The manifest's `diagnostics` of one routing (one value per routed row in every array)."""
    n = len(score)
    return {
        "rows": n,
        "spearman": D.correlations(score, covariates, sources),
        "splits": {"by_source": D.splits(rl, sources), "by_format": D.splits(rl, formats)},
        "truncated": {"sft": int(np.sum(truncated & ~rl)), "rl": int(np.sum(truncated & rl))},
        "agreement": D.agreement(metrics) if n else {},
        "source_dependence": D.source_dependence(rl, sources),
    }
