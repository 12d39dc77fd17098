"""`curate prism --dry-run`: what a run would do and about how long its probe would take, without
probing the corpus or writing an output.

Ingest and tokenize run as in a real run (they are cheap, and their cached shards are what the real run
then reuses); the probe model is loaded and timed on one real batch: the median of the run's own
token-budget batches, after an untimed warm-up on the shortest example. The estimate is that batch's
seconds per padded token times the padded tokens of every batch, plus the model's load time."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from curate import models
from curate.batching import right_pad, token_batches
from curate.config import PrismConfig
from curate.engine.executors import LocalExecutor
from curate.engine.shards import run_ingest, run_sharded
from curate.io import folders
from curate.io.atomic import clean_stale_temps, read_arrow
from curate.jobs.prism import PrismJob
from curate.stages.configs import resolved_dtype
from curate.stages.probe import probe_at
from curate.stages.tokenize import Tokenize


def dry_run(cfg: PrismConfig) -> dict:
    """The plan of a prism run: records, shards, tokens, and the estimated probe time (s) from a timed
    calibration batch. Locks OUT and WORK like a run; writes only the ingest and tokenize caches."""
    PrismJob(cfg).check()
    with folders.job_folders(Path(cfg.out).resolve(), cfg.work_dir, cfg.input):
        clean_stale_temps(cfg.work_dir)
        ingest, _ = run_ingest(cfg, cfg.work_dir / "ingest")
        tok, _ = run_sharded(Tokenize(cfg.tokenize()), ingest["shards"], cfg.work_dir / "tokenize",
                             LocalExecutor(), cfg.force)
    ids, masks, stats = [], [], {"n_tokens": 0, "n_loss_tokens": 0, "truncated": 0, "token_errors": 0}
    for shard in tok:
        table = read_arrow(shard["path"], ["input_ids", "loss_mask", "n_tokens", "n_loss_tokens", "truncated",
                                           "token_error"])
        ok = [e is None for e in table.column("token_error").to_pylist()]
        stats["token_errors"] += ok.count(False)
        keep = np.flatnonzero(ok)
        stats["n_tokens"] += int(table.column("n_tokens").to_numpy()[keep].sum())
        stats["n_loss_tokens"] += int(table.column("n_loss_tokens").to_numpy()[keep].sum())
        stats["truncated"] += int(table.column("truncated").to_numpy(zero_copy_only=False)[keep].sum())
        ids += [table.column("input_ids")[int(i)].as_py() for i in keep]
        masks += [table.column("loss_mask")[int(i)].as_py() for i in keep]
    plan = {"records": ingest["counts"]["input"], "duplicates": ingest["counts"]["duplicates"],
            "quarantined_ingest": ingest["counts"]["quarantined"], "shards": len(ingest["shards"]),
            "to_probe": len(ids), **stats}
    if cfg.scheduler or cfg.workers:
        plan["note"] = ("the calibration ran in this process, on this machine: the estimate is for one process "
                        "here, not for the cluster's workers")
    if not ids:
        return {**plan, "padded_tokens": 0, "estimate_s": 0.0}
    batches = token_batches([len(x) for x in ids], cfg.batch_tokens)
    padded = sum(len(b) * len(ids[b[0]]) for b in batches)   # each batch: longest first
    return {**plan, "batches": len(batches), "padded_tokens": padded, **_calibrate(cfg, ids, masks, batches, padded)}


def _calibrate(cfg: PrismConfig, ids: list, masks: list, batches: list[list[int]], padded: int) -> dict:
    """Load the probe model (timed), warm it up, time the median batch; the estimate from its rate."""
    pcfg = cfg.probe()
    device = models.resolve_device(pcfg.device)
    start = time.perf_counter()
    model = models.load_model(models.resolve(pcfg.model, pcfg.trust_remote_code), device)
    load_s = time.perf_counter() - start
    from curate.stages.probe import Probe

    rmap = Probe(pcfg).role_map(model)
    dtype = resolved_dtype(pcfg.dtype)

    def probe(rows: list[int]) -> float:
        start = time.perf_counter()
        batch = right_pad([ids[r] for r in rows], [masks[r] for r in rows], device)
        probe_at(dtype, model, rmap, *batch)
        return time.perf_counter() - start

    probe([min(range(len(ids)), key=lambda i: len(ids[i]))])   # warm-up: allocations, kernels
    median = batches[len(batches) // 2]
    seconds = probe(median)
    rate = seconds / (len(median) * len(ids[median[0]]))
    return {"device": device, "model_load_s": round(load_s, 2), "calibration_tokens": len(median) * len(ids[median[0]]),
            "calibration_s": round(seconds, 3), "estimate_s": round(load_s + rate * padded, 1)}


def describe(plan: dict) -> str:
    """The plan as the command line prints it."""
    lines = [f"dry run: {plan['records']} records (duplicates {plan['duplicates']}, quarantined at ingest "
             f"{plan['quarantined_ingest']}) in {plan['shards']} shards; {plan['to_probe']} to probe "
             f"({plan['token_errors']} rejected by tokenize)",
             f"  tokens {plan['n_tokens']} (assistant {plan['n_loss_tokens']}), truncated rows {plan['truncated']}"]
    if plan.get("batches"):
        lines.append(f"  probe: {plan['batches']} batches, {plan['padded_tokens']} padded tokens; calibration on "
                     f"{plan['device']}: {plan['calibration_tokens']} tokens in {plan['calibration_s']} s, model load "
                     f"{plan['model_load_s']} s")
        lines.append(f"  estimated probe time: {plan['estimate_s']:.0f} s (~{plan['estimate_s'] / 60:.1f} min)")
    if plan.get("note"):
        lines.append(f"  note: {plan['note']}")
    return "\n".join(lines)
