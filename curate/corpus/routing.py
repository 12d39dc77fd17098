"""The two passes of routing a prism run's cache: the corpus scores (pass 1, for the threshold), then per
work shard the routed rows, written as that shard's part of each partition, and its quarantine rows."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.corpus import route
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


def _shard_scores(paths: tuple, cfg: route.RouteConfig) -> np.ndarray:
    ing, tok, prb, _ = paths
    probe, _ = _scored_probe(read_arrow(prb), cfg.metric, read_arrow(tok, ["token_error"]).column("token_error"))  # memory-mapped: columns not used are not read
    if cfg.metric in probe.column_names:  # stored by the probe stage (older caches: computed here)
        # a copy: a view would keep the shard's memory map, and the pages it touched, for the whole run
        return probe.column(cfg.metric).drop_null().to_numpy().copy()
    norms = probe.column("grad_norms")
    ids = read_arrow(ing, ["id"]).column("id")
    if norms.null_count:
        ids, norms = ids.filter(pc.invert(pc.is_null(norms))), norms.drop_null()
    return route.scores(ids.to_pylist(), norms, cfg.seed, (cfg.metric,))[cfg.metric]


def corpus_scores(shards: list[tuple], cfg: route.RouteConfig, pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
    """Pass 1: the routing score of every probed row, shard by shard (`shard_paths`; only ids and norms
    are read). 4 bytes a row, the one thing route holds for the whole corpus: an exact quantile needs them all."""
    if pool is None:
        return [_shard_scores(s, cfg) for s in shards]
    return list(pool.map(_shard_scores, shards, [cfg] * len(shards)))


@dataclass
class RoutedShard:
    """Pass 2's result for one work shard."""

    quarantine: list[dict]        # its tokenize and probe rejects
    truncated: int                # rows whose context was cut to --max-length
    counts: dict[str, int]        # rows written per partition
    template: Counter             # ("rendering"|"unrendered", what) over its routed rows: how the template
                                  # rendered tool data (chat.Encoded.tool_rendering) and what of the assistant
                                  # turns it wrote nowhere (chat.Encoded.unrendered)


def route_shard(i: int, paths: tuple, score: np.ndarray, threshold: float, cfg: route.RouteConfig,
                prefix_rows: str, output) -> RoutedShard:
    """Pass 2 for work shard i: route its probed rows and write each partition's part i into `output`
    (an engine.outputs.JobOutput; safe from several threads)."""
    ing, tok, prb, sig = paths
    records, tokens = read_arrow(ing), read_arrow(tok)
    probe, overflow = _scored_probe(read_arrow(prb), cfg.metric, tokens.column("token_error"))
    truncated = pc.sum(tokens.column("truncated")).as_py() or 0
    template = Counter()
    if "tool_rendering" in tokens.column_names:  # caches from before tool support have no such column
        routed = tokens.filter(pc.is_valid(probe.column("grad_norms")))
        template.update(("rendering", way) for way in routed.column("tool_rendering").drop_null().to_pylist())
        template.update(("unrendered", what) for lost in routed.column("unrendered").drop_null().to_pylist()
                        for what in lost)
    rows = route.routed_rows(records, tokens, probe, threshold, cfg, signal_columns(sig),
                             prefix_rows, known={cfg.metric: score})
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
