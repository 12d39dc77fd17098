"""Writes routed/: sft/ and rl/ Arrow stream shards, quarantine/, and manifest.json.

Everything, manifest last, is built in a staging folder beside OUT and switched in as a whole
(`curate.io.output.commit`), so a reader never sees a half-written partition, or partitions and a
manifest of different runs, and a rerun leaves no stale shard behind. Shard i of each partition holds the
rows of work shard i in input order: the same input gives the same files, byte for byte."""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import curate
from curate.io import output
from curate.io.atomic import jsonl_writer, read_arrow, write_arrow, write_json
from curate.io.quarantine import quarantine_rows, reconcile
from curate.stages import route

PARTITIONS = ("sft", "rl")


def _shards(state: dict):
    """(records, tokens, probe, [signal stage shards]) paths of every work shard."""
    signals = list(state.get("signals", {}).values())
    for i, (ing, tok, prb) in enumerate(zip(state["ingest"]["shards"], state["tokenize"], state["probe"])):
        yield ing["path"], tok["path"], prb["path"], [s[i]["path"] for s in signals]


def _signal_columns(paths: list[str]) -> pa.Table | None:
    tables = [read_arrow(p) for p in paths]
    if not tables:
        return None
    return pa.table({name: t.column(name) for t in tables for name in t.column_names})


def _scored_probe(probe: pa.Table, metric: str) -> tuple[pa.Table, pa.Array]:
    """The probe shard with the rows it scored but whose loss, total norm or stored routing score is not
    finite (the model overflowed on that example, e.g. in bf16) nulled like unscored rows, and the mask of
    those rows: route quarantines them (stage "probe") instead of routing a NaN."""
    scored = pc.is_valid(probe.column("grad_norms"))
    finite = pc.and_(pc.is_finite(probe.column("probe_loss")), pc.is_finite(probe.column("grad_norm_total")))
    if metric in probe.column_names:
        finite = pc.and_(finite, pc.is_finite(probe.column(metric)))
    bad = pc.and_(scored, pc.invert(pc.fill_null(finite, False)))
    if not pc.any(bad).as_py():
        return probe, bad
    nulled = {name: pc.if_else(bad, pa.scalar(None, probe.schema.field(name).type), probe.column(name))
              for name in probe.column_names}
    return pa.table(nulled, schema=probe.schema), bad


def _shard_scores(paths: tuple, cfg: route.RouteConfig) -> np.ndarray:
    ing, _, prb, _ = paths
    probe, _ = _scored_probe(read_arrow(prb), cfg.metric)  # memory-mapped: columns not used are not read
    if cfg.metric in probe.column_names:  # stored by the probe stage (older caches: computed here)
        # a copy: a view would keep the shard's memory map, and the pages it touched, for the whole run
        return probe.column(cfg.metric).drop_null().to_numpy().copy()
    norms = probe.column("grad_norms")
    ids = read_arrow(ing, ["id"]).column("id")
    if norms.null_count:
        ids, norms = ids.filter(pc.invert(pc.is_null(norms))), norms.drop_null()
    return route.scores(ids.to_pylist(), norms, cfg.seed, (cfg.metric,))[cfg.metric]


def corpus_scores(state: dict, cfg: route.RouteConfig, pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
    """Pass 1: the routing score of every probed row, shard by shard (only ids and norms are read).
    4 bytes a row, the one thing route holds for the whole corpus: an exact quantile needs them all."""
    shards = list(_shards(state))
    if pool is None:
        return [_shard_scores(s, cfg) for s in shards]
    return list(pool.map(_shard_scores, shards, [cfg] * len(shards)))


def _route_shard(i: int, paths: tuple, score: np.ndarray, threshold: float, cfg: route.RouteConfig,
                 prefix_rows: str, staging: Path) -> tuple[list[dict], int, dict[str, tuple[str, int, str]], Counter]:
    """Pass 2 for one shard: its tokenize quarantine rows, truncations, written partition files and, over
    its routed rows, how the template rendered tool data (chat.Encoded.tool_rendering) and what of the
    assistant turns it wrote nowhere (chat.Encoded.unrendered), as one Counter of ("rendering"|"unrendered", what)."""
    ing, tok, prb, sig = paths
    records, tokens = read_arrow(ing), read_arrow(tok)
    probe, overflow = _scored_probe(read_arrow(prb), cfg.metric)
    truncated = pc.sum(tokens.column("truncated")).as_py() or 0
    template = Counter()
    if "tool_rendering" in tokens.column_names:  # caches from before tool support have no such column
        routed = tokens.filter(pc.is_valid(probe.column("grad_norms")))
        template.update(("rendering", way) for way in routed.column("tool_rendering").drop_null().to_pylist())
        template.update(("unrendered", what) for lost in routed.column("unrendered").drop_null().to_pylist()
                        for what in lost)
    rows = route.routed_rows(records, tokens, probe, threshold, cfg, _signal_columns(sig),
                             prefix_rows, known={cfg.metric: score})
    written = {}
    for part in PARTITIONS:
        subset = rows.filter(pc.equal(rows.column("route"), part))
        if subset.num_rows:
            name = f"{part}/part-{i:05d}.arrow"
            written[part] = (name, subset.num_rows, write_arrow(staging / name, subset))
    bad = _token_quarantine(records, tokens) + quarantine_rows(
        records.filter(overflow), "probe", "the probe's loss or gradient norms are not finite on this example "
        "(the model overflows on it; try --dtype fp32)")
    return bad, truncated, written, template


def _counts(counter: Counter, kind: str) -> dict[str, int]:
    """{what: n} of the (kind, what) keys of `counter`, sorted by what."""
    return {what: n for (k, what), n in sorted(counter.items()) if k == kind}


def _token_quarantine(records: pa.Table, tokens: pa.Table) -> list[dict]:
    bad = pc.invert(pc.is_null(tokens.column("token_error")))
    return quarantine_rows(records.filter(bad), "tokenize", tokens.column("token_error").filter(bad).to_pylist())


class NothingRouted(ValueError):
    """Every record was quarantined or a duplicate: the output is written (its quarantine says why), and
    the job fails (exit code 2) rather than report a split of nothing."""


def write(state: dict, cfg: route.RouteConfig, out: Path) -> dict:
    """Route every probed row and switch the new OUT in; the caller holds OUT's lock (io.output).
    Returns the manifest; NothingRouted after the switch when no row was routed."""
    t0 = time.perf_counter()
    # Shards are independent in both passes; their numpy/arrow work and file writes release the GIL, so
    # two threads use two cores. Results are taken in shard order: the same bytes as one thread.
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    scores = corpus_scores(state, cfg, pool)
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    threshold = route.corpus_threshold(all_scores, cfg) if all_scores.size or cfg.threshold is not None else None
    staging = output.new_staging(out)
    counts = {p: 0 for p in PARTITIONS}
    files = {p: [] for p in PARTITIONS}
    digests = {}
    truncated = 0
    prefix_rows = state["config"].get("prefix", "none")
    # quarantine is streamed to its file (ingest's rows, then each shard's tokenize rows): never in memory
    shards = list(_shards(state))
    with pool, jsonl_writer(staging / "quarantine" / "part-00000.jsonl") as quarantine:
        quarantine.copy_lines(state["ingest"]["quarantine"])
        results = pool.map(_route_shard, range(len(shards)), shards, scores, [threshold] * len(shards),
                           [cfg] * len(shards), [prefix_rows] * len(shards), [staging] * len(shards))
        template, probe_rejects = Counter(), 0
        for bad, n_truncated, written, shard_template in results:
            template.update(shard_template)
            for row in bad:
                quarantine.write(row)
                probe_rejects += row["stage"] == "probe"
            truncated += n_truncated
            for part, (name, n, sha) in written.items():
                files[part].append(name)
                digests[name] = sha
                counts[part] += n
    for part in PARTITIONS:  # an empty partition is an empty folder: readers find it, with no rows
        (staging / part).mkdir(exist_ok=True)
    ing_counts = state["ingest"]["counts"]
    manifest = {
        "curate_version": curate.__version__,
        "counts": {"input": ing_counts["input"], "duplicates": ing_counts["duplicates"],
                   "quarantined": quarantine.count, "quarantined_ingest": ing_counts["quarantined"],
                   "quarantined_tokenize": quarantine.count - ing_counts["quarantined"] - probe_rejects,
                   "quarantined_probe": probe_rejects,
                   "truncated": truncated, **counts},
        "routing": {**asdict(cfg), "threshold": threshold, "rule": "score <= threshold -> sft" +
                    (" (reversed: -> rl)" if cfg.reverse else "")},
        "files": files,
        "sha256": digests,
        "model": state["model"],
        "chat_template": {**(state["tokenize"][0].get("chat_template") or {} if state["tokenize"] else {}),
                          "tool_rendering": _counts(template, "rendering"),
                          "unrendered": _counts(template, "unrendered")},
        "ingest_notes": state["ingest"].get("notes", {}),
        "modules": state["modules"],
        "probe_map": state.get("probe_map"),
        "config": state["config"],
        "inputs": state["ingest"]["files"],
        "skipped_files": state["ingest"].get("skipped", []),
        "cache": state["cache"],
        "timings_s": {**{k: round(v, 3) for k, v in state["timings"].items()},
                      "route": round(time.perf_counter() - t0, 3)},
        "versions": versions(),
    }
    c = manifest["counts"]
    reconcile(c, "sft", "rl", "quarantined", "duplicates")
    write_json(staging / "manifest.json", manifest)
    output.commit(out)
    if not c["sft"] + c["rl"]:
        raise NothingRouted(f"nothing routed: 0 of {c['input']} records (quarantined {c['quarantined']}, "
                            f"duplicates {c['duplicates']}); the reasons are in {out / 'quarantine'}/")
    return manifest


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def provenance(cfg, ingest: dict, cache: dict, timings: dict) -> dict:
    """The manifest fields every job shares: what ran, on what, from cache or not, how long, with what."""
    return {"config": asdict(cfg), "inputs": ingest["files"], "skipped_files": ingest.get("skipped", []),
            "ingest_notes": ingest.get("notes", {}),
            "cache": cache, "timings_s": {k: round(v, 3) for k, v in timings.items()}, "versions": versions()}


def versions() -> dict:
    import datasets
    import polars
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pa.__version__, "datasets": datasets.__version__, "polars": polars.__version__}
