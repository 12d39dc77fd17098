"""The two passes of routing a prism run's cache: the corpus scores (pass 1, for the threshold), then per
work shard the routed rows, written as that shard's part of each partition, and its quarantine rows."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import concentration, schema
from curate.corpus import diagnostics, route
from curate.corpus.attribution import Entries, norm_matrix, top_modules
from curate.io.atomic import read_arrow
from curate.io.quarantine import quarantine_rows


def shard_paths(state: dict):
    """(records, tokens, probe, [signal stage shards]) paths of every work shard of a prism run's state."""
    signals = list(state.get("signals", {}).values())
    for i, (ing, tok, prb) in enumerate(zip(state["ingest"]["shards"], state["tokenize"], state["probe"])):
        yield ing["path"], tok["path"], prb["path"], [s[i]["path"] for s in signals]


def signal_columns(paths: list[str]) -> pa.Table | None:
    """The columns of one work shard's signal stage files side by side (one row per record), or None
    without any file. A column name two files share keeps the later file's column."""
    tables = [read_arrow(p) for p in paths]
    if not tables:
        return None
    return pa.table({name: t.column(name) for t in tables for name in t.column_names})


def _scored_probe(probe: pa.Table, metric: str, token_error: pa.ChunkedArray) -> tuple[pa.Table, pa.Array]:
    """The probe shard with the rows it failed on nulled like unscored rows, and the mask of those rows:
    route quarantines them (stage "probe") instead of routing a NaN. A row fails when it was tokenized
    (`token_error` null) but has no gradient norms (the probe stores none when the gradient is NaN), or
    its loss, total norm or stored routing score is not finite (the model overflowed on that example,
    e.g. in bf16)."""
    scored = pc.is_valid(probe.column("grad_norms"))
    finite = pc.and_(pc.is_finite(probe.column("probe_loss")), pc.is_finite(probe.column("grad_norm_total")))
    if metric in probe.column_names:
        finite = pc.and_(finite, pc.is_finite(probe.column(metric)))
    bad = pc.or_(pc.and_(scored, pc.invert(pc.fill_null(finite, False))),
                 pc.and_(pc.is_null(token_error), pc.invert(scored)))
    if not pc.any(bad).as_py():
        return probe, bad
    nulled = {name: pc.if_else(bad, pa.scalar(None, probe.schema.field(name).type), probe.column(name))
              for name in probe.column_names}
    return pa.table(nulled, schema=probe.schema), bad


@dataclass
class ShardFeatures:
    """Pass 1's values for one work shard's routable rows (those with finite gradient norms), in order:
    what routing and its diagnostics need, about 45 bytes a row (the one thing route holds for the whole
    corpus: exact quantiles and rank correlations need every row)."""

    metrics: dict[str, np.ndarray]      # schema.METRICS, float32
    covariates: dict[str, np.ndarray]   # diagnostics.COVARIATES, float64
    truncated: np.ndarray               # bool
    source: tuple[list[str], np.ndarray]   # (labels, int32 index of each row's label)
    format: tuple[list[str], np.ndarray]

    def __len__(self) -> int:
        return len(self.truncated)


def _labels(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    if not len(column):
        return [], np.zeros(0, np.int32)
    encoded = pc.dictionary_encode(column.combine_chunks())
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)


def shard_features(paths: tuple, cfg: route.RouteConfig, numel: np.ndarray | None = None) -> ShardFeatures:
    """Pass 1 for one work shard (`shard_paths`): the metrics of its routable rows (read where the probe
    stored them; all recomputed from norms / sqrt(numel) with `numel`, --module-scale numel), the
    diagnostics' covariates, truncation and labels. Only the columns named are read (memory-mapped)."""
    ing, tok, prb, _ = paths
    tokens = read_arrow(tok, ["token_error", *schema.TOKEN_COLUMNS])
    probe, _ = _scored_probe(read_arrow(prb), cfg.metric, tokens.column("token_error"))
    keep = pc.is_valid(probe.column("grad_norms"))
    probe, tokens = probe.filter(keep), tokens.filter(keep)   # filtered: copies, no view of the memory map
    records = read_arrow(ing, ["id", "source", "format"]).filter(keep)
    ids = records.column("id").to_pylist()
    if numel is None:
        stored = {m: probe.column(m).to_numpy() for m in schema.NORM_METRICS if m in probe.column_names}
        computed = route.scores(ids, probe.column("grad_norms"), cfg.seed,
                                tuple(m for m in schema.METRICS if m not in stored))
        metrics = {m: stored[m] if m in stored else computed[m] for m in schema.METRICS}
    else:
        scaled = (norm_matrix(probe.column("grad_norms")) / np.sqrt(numel)).astype(np.float32)
        metrics = {m: v.astype(np.float32) for m, v in concentration.all_metrics(scaled, ids, cfg.seed).items()}
    covariates = {name: (tokens if name in tokens.column_names else probe).column(name).to_numpy().astype(np.float64)
                  for name in diagnostics.COVARIATES}
    return ShardFeatures(metrics, covariates, tokens.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
                         _labels(records.column("source")), _labels(records.column("format")))


def corpus_features(shards: list[tuple], cfg: route.RouteConfig, numel: np.ndarray | None = None,
                    pool: ThreadPoolExecutor | None = None) -> list[ShardFeatures]:
    """Pass 1 over every shard, in shard order (on `pool`'s threads when given)."""
    n = len(shards)
    if pool is None:
        return [shard_features(s, cfg, numel) for s in shards]
    return list(pool.map(shard_features, shards, [cfg] * n, [numel] * n))


@dataclass
class RoutedShard:
    """Pass 2's result for one work shard."""

    quarantine: list[dict]        # its tokenize and probe rejects
    truncated: int                # rows whose context was cut to --max-length
    counts: dict[str, int]        # rows written per partition
    template: Counter             # ("rendering"|"unrendered", what) over its routed rows: how the template
                                  # rendered tool data (chat.Encoded.tool_rendering) and what of the assistant
                                  # turns it wrote nowhere (chat.Encoded.unrendered)


def route_shard(i: int, paths: tuple, decision: dict[str, np.ndarray], entries: Entries, metric: str,
                prefix_rows: str, output) -> RoutedShard:
    """Pass 2 for work shard i: its routable rows with their `decision` (corpus.decide: one value per
    routable row, in order) and `top_modules`, written as each partition's part i into `output` (an
    engine.outputs.JobOutput; safe from several threads), and its tokenize and probe rejects."""
    ing, tok, prb, sig = paths
    records, tokens = read_arrow(ing), read_arrow(tok)
    probe, overflow = _scored_probe(read_arrow(prb), metric, tokens.column("token_error"))
    truncated = pc.sum(tokens.column("truncated")).as_py() or 0
    routable = pc.is_valid(probe.column("grad_norms"))
    template = Counter()
    if "tool_rendering" in tokens.column_names:  # caches from before tool support have no such column
        routed = tokens.filter(routable)
        template.update(("rendering", way) for way in routed.column("tool_rendering").drop_null().to_pylist())
        template.update(("unrendered", what) for lost in routed.column("unrendered").drop_null().to_pylist()
                        for what in lost)
    top = top_modules(probe.column("grad_norms").filter(routable), entries)
    rows = route.routed_rows(records, tokens, probe, {**decision, "top_modules": top}, signal_columns(sig),
                             prefix_rows)
    counts = {}
    for part in route.PARTITIONS:
        subset = rows.filter(pc.equal(rows.column("route"), part))
        if subset.num_rows:
            output.write_part(part, i, subset)
            counts[part] = subset.num_rows
    bad = _token_quarantine(records, tokens) + quarantine_rows(
        records.filter(overflow), "probe", "the probe's loss or gradient norms are not finite on this example "
        "(the model overflows on it; try --dtype fp32)")
    return RoutedShard(bad, truncated, counts, template)


def _token_quarantine(records: pa.Table, tokens: pa.Table) -> list[dict]:
    bad = pc.invert(pc.is_null(tokens.column("token_error")))
    return quarantine_rows(records.filter(bad), "tokenize", tokens.column("token_error").filter(bad).to_pylist())
