"""Runs the drift job: ingest -> rollout per shard (cached) -> returns and weights (global) -> OUT/sft/.

Rollouts are the expensive part and are cached per shard like the probe (WORK/rollout/part-NNNNN.arrow
and its .done.json; the key holds the generation config, seed, verifier and model identity). Returns and
weights are recomputed on every run from the cached verdicts: a prompt group can span shards (equal
prompts in several records, e.g. two attempts at one ALFWorld game), and a new beta or gamma then costs
seconds. Output follows routed/: Arrow stream shards and the manifest built beside OUT and switched in as a whole."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

import curate
from curate import chat, generation, models, schema
from curate.config import DriftConfig
from curate.executors import make_executor
from curate.io import output
from curate.io.atomic import clean_stale_temps, read_arrow, stable_hash, write_arrow, write_json, write_jsonl
from curate.io.quarantine import quarantine_row, reconcile
from curate.io.routed import provenance, read_jsonl
from curate.messages import compact_all
from curate.pipeline import run_ingest, run_sharded, timed
from curate.report import try_write_report
from curate.returns import ReturnConfig, trajectory_return
from curate.stages import weights as W
from curate.stages.rollout import Rollout

DRIFT = "drift"
RECORD_COLUMNS = ("id", "source", "source_index", "format", "tools", "ground_truth", "reward", "metadata")


def final_assistant(messages: list[dict]) -> int:
    """Index of the last assistant turn (DRIFT trains that turn only)."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def prompt_id(prompt: list[dict], tools: str | None = None) -> str:
    """Equal prompts (every message field) with equal tools, equal id; tool-free prompts hash as before."""
    body = compact_all(prompt)
    return stable_hash(body if tools is None else [body, tools])[:32]


def shard_rows(records: pa.Table, rollout: pa.Table, rcfg: ReturnConfig, recorded: bool) -> list[dict]:
    """One row per trajectory of one shard, in record then sample order, without weights."""
    rows = []
    for rec, rol in zip(records.to_pylist(), rollout.to_pylist()):
        if rol["rollout_error"] is not None:
            continue
        for k, traj in enumerate(rol["trajectories"]):
            ret = trajectory_return(rol["turn_correct"][k], rol["turn_parseable"][k], rol["turn_answers"][k],
                                    rcfg, recorded=rol["turn_score"][k][0] if recorded else None)
            last = final_assistant(traj)
            prompt = chat.prompt_messages(traj)
            rows.append({**{c: rec.get(c) for c in RECORD_COLUMNS}, "prompt_id": prompt_id(prompt, rec.get("tools")),
                         "sample_index": k, "messages": traj, "prompt": prompt, "train_context": traj[:last],
                         "train_target": chat.turn_text(traj[last]), "turns": len(rol["turn_correct"][k]),
                         "t_star": ret.t_star, "success": ret.success,
                         "return": ret.total, "return_outcome": ret.outcome, "return_format": ret.format,
                         "return_repetition": ret.repetition})
    return rows


def _rollout_quarantine(records: pa.Table, rollout: pa.Table) -> list[dict]:
    return [quarantine_row(rec, "rollout", err)
            for rec, err in zip(records.to_pylist(), rollout.column("rollout_error").to_pylist()) if err is not None]


def run_drift(cfg: DriftConfig) -> dict:
    """The whole job, holding the locks of OUT and WORK (io.output); returns the manifest it wrote."""
    with output.job_folders(Path(cfg.out).resolve(), cfg.work_dir, cfg.input):
        return _run_drift(cfg)


def _run_drift(cfg: DriftConfig) -> dict:
    work, out = cfg.work_dir, Path(cfg.out).resolve()
    clean_stale_temps(work)
    stage, rcfg, wcfg = Rollout(cfg.rollout()), cfg.returns(), cfg.weights()  # validate before rollouts
    recorded = stage.config.recorded
    executor = make_executor(cfg.workers, cfg.scheduler)
    timings, cache = {}, {}
    try:
        with timed(timings, "ingest"):
            ing, cache["ingest"] = run_ingest(cfg, work / "ingest")
        with timed(timings, "rollout"):
            gpu = not recorded and models.resolve_device(cfg.device) == "cuda"
            rol, cache["rollout"] = run_sharded(stage, ing["shards"], work / "rollout", executor, cfg.force, gpu=gpu)
    finally:
        executor.close()
    t = time.perf_counter()
    shards = [(i["path"], r["path"]) for i, r in zip(ing["shards"], rol)]

    # pass 1: returns and group keys of every row (groups can span shards)
    keys, returns, success, t_star = [], [], [], []
    for ing_path, rol_path in shards:
        for row in shard_rows(read_arrow(ing_path), read_arrow(rol_path), rcfg, recorded):
            keys.append(row["prompt_id"])
            returns.append(row["return"])
            success.append(row["success"])
            t_star.append(row["t_star"])
    weighted = W.assign(keys, returns, success, wcfg)
    kept_keys = (k for k, keep in zip(keys, weighted.keep) if keep)
    group_of = {k: g for g, k in enumerate(dict.fromkeys(kept_keys))}   # dense ids, first-appearance order
    quarantine = read_jsonl(ing["quarantine"])
    staging = output.new_staging(out)
    files, prompts = _write_sft(shards, weighted, group_of, rcfg, recorded, staging, quarantine)
    prompts_dropped = _records_with_rows(shards) - prompts
    timings["weights"] = time.perf_counter() - t

    ic, ws = ing["counts"], weighted.stats
    counts = {"input": ic["input"], "duplicates": ic["duplicates"], "quarantined": len(quarantine),
              "quarantined_ingest": ic["quarantined"], "quarantined_rollout": len(quarantine) - ic["quarantined"],
              "prompts": prompts, "prompts_dropped": prompts_dropped, "sft": ws["rows"],
              "rows_dropped": ws["rows_dropped"], "successes": int(np.sum(np.asarray(success)[weighted.keep]))}
    reconcile(counts, "prompts", "prompts_dropped", "quarantined", "duplicates")
    solved = [t for t in t_star if t is not None]
    gen = cfg.generation()
    manifest = {
        "curate_version": curate.__version__,
        "job": DRIFT,
        "counts": counts,
        "weights": {**asdict(wcfg), **ws},
        "returns": {**asdict(rcfg), "mean": float(np.mean(returns)) if returns else None,
                    "success_rate": float(np.mean(success)) if success else None,
                    "t_star": {str(t): solved.count(t) for t in sorted(set(solved))}},
        "rollout": {k: v for k, v in asdict(stage.config).items() if k != "generation"},
        "generation": None if recorded else {**asdict(gen), "engine": generation.resolve_engine(gen)},
        "files": {"sft": list(files)},
        "sha256": files,
        "model": None if recorded else models.identity(models.resolve(cfg.model, cfg.trust_remote_code)),
        **provenance(cfg, ing, cache, timings),
    }
    write_json(staging / "manifest.json", manifest)
    output.commit(out)
    try_write_report(cfg.out)  # after the data and manifest are committed: a failure only warns
    return manifest


def _write_sft(shards, weighted: W.Weighted, group_of: dict, rcfg: ReturnConfig, recorded: bool,
               staging: Path, quarantine: list[dict]) -> tuple[dict[str, str], int]:
    """Pass 2: rows with their weights, work shard i -> sft/part-i, written into staging with the
    quarantine (to which the rollout stage's rejects are added). Returns the files ({name: sha256}) and the
    number of records that kept rows."""
    target = schema.arrow_schema(DRIFT)
    files, cursor, prompts = {}, 0, 0
    for i, (ing_path, rol_path) in enumerate(shards):
        records, rollout = read_arrow(ing_path), read_arrow(rol_path)
        quarantine.extend(_rollout_quarantine(records, rollout))   # the caller counts them
        kept = []
        for row in shard_rows(records, rollout, rcfg, recorded):
            if weighted.keep[cursor]:
                row.update(group_id=group_of[row["prompt_id"]], weight=float(weighted.weight[cursor]),
                           ess=float(weighted.group_ess[cursor]))
                kept.append(row)
            cursor += 1
        prompts += len({r["id"] for r in kept})
        if kept:
            name = f"sft/part-{i:05d}.arrow"
            files[name] = write_arrow(staging / name, pa.Table.from_pylist(kept, schema=target))
    write_jsonl(staging / "quarantine" / "part-00000.jsonl", quarantine)
    (staging / "sft").mkdir(exist_ok=True)
    return files, prompts


def _records_with_rows(shards) -> int:
    """Records that produced trajectories (not quarantined by the rollout stage)."""
    return sum(read_arrow(r, ["rollout_error"]).column("rollout_error").null_count for _, r in shards)
