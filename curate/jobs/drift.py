"""The drift job: ingest -> rollout per shard (cached) -> returns and weights (global) -> OUT/sft/.

Rollouts are the expensive part and are cached per shard like the probe (WORK/rollout/part-NNNNN.arrow
and its .done.json; the key holds the generation config, seed, verifier and model identity). Returns and
weights are recomputed on every run from the cached verdicts: a prompt group can span shards (equal
prompts in several records, e.g. two attempts at one ALFWorld game), and a new beta or gamma then costs
seconds."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from curate import chat, generation, models, schema
from curate.config import DriftConfig
from curate.corpus import weights as W
from curate.corpus.routing import signal_columns
from curate.engine.outputs import JobOutput, provenance
from curate.io.atomic import read_arrow, stable_hash
from curate.io.quarantine import quarantine_row
from curate.jobs.base import INGEST, Job, StageRun
from curate.messages import compact_all
from curate.returns import ReturnConfig, trajectory_return
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


def shard_rows(records: pa.Table, rollout: pa.Table, rcfg: ReturnConfig, recorded: bool,
               signals: pa.Table | None = None) -> list[dict]:
    """One row per trajectory of one shard, in record then sample order, without weights; each carries
    its record's signal columns (`signals`: one row per record, from the job's signal stages)."""
    per_record = signals.to_pylist() if signals is not None else [{}] * records.num_rows
    rows = []
    for rec, rol, sig in zip(records.to_pylist(), rollout.to_pylist(), per_record):
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
                         "return_repetition": ret.repetition, **sig})
    return rows


def _rollout_quarantine(records: pa.Table, rollout: pa.Table) -> list[dict]:
    return [quarantine_row(rec, "rollout", err)
            for rec, err in zip(records.to_pylist(), rollout.column("rollout_error").to_pylist()) if err is not None]


class DriftJob(Job):
    """`curate drift`: K multi-turn rollouts per prompt, DRIFT returns and per-group weights -> OUT/sft/."""

    name = DRIFT
    config = DriftConfig
    partitions = ("sft",)
    balance = ("prompts", "prompts_dropped", "quarantined", "duplicates")

    def stages(self):
        return [(Rollout(self.cfg.rollout()), INGEST)]

    def check(self) -> None:
        super().check()
        self.cfg.returns(), self.cfg.weights()  # their options, before any rollout

    def corpus(self, run: StageRun) -> dict:
        cfg, t = self.cfg, time.perf_counter()
        rcfg, wcfg = cfg.returns(), cfg.weights()
        recorded = cfg.rollout().recorded
        signals = [stage.name for stage in self.signals()]
        shards = [(ing["path"], rol["path"], run.signal_paths(signals, i))
                  for i, (ing, rol) in enumerate(zip(run.ingest["shards"], run.shards["rollout"]))]

        # pass 1: returns and group keys of every row (groups can span shards)
        keys, returns, success, t_star = [], [], [], []
        for ing_path, rol_path, _ in shards:
            for row in shard_rows(read_arrow(ing_path), read_arrow(rol_path), rcfg, recorded):
                keys.append(row["prompt_id"])
                returns.append(row["return"])
                success.append(row["success"])
                t_star.append(row["t_star"])
        weighted = W.assign(keys, returns, success, wcfg)
        kept_keys = (k for k, keep in zip(keys, weighted.keep) if keep)
        group_of = {k: g for g, k in enumerate(dict.fromkeys(kept_keys))}   # dense ids, first-appearance order
        with JobOutput(DriftJob, cfg.out_dir, run.ingest["quarantine"]) as output:
            prompts = _write_sft(shards, weighted, group_of, rcfg, recorded, output)
        prompts_dropped = _records_with_rows(shards) - prompts
        run.timings["weights"] = time.perf_counter() - t

        ic, ws = run.ingest["counts"], weighted.stats
        quarantined = output.quarantine.count
        counts = {"input": ic["input"], "duplicates": ic["duplicates"], "quarantined": quarantined,
                  "quarantined_ingest": ic["quarantined"], "quarantined_rollout": quarantined - ic["quarantined"],
                  "prompts": prompts, "prompts_dropped": prompts_dropped, "sft": ws["rows"],
                  "rows_dropped": ws["rows_dropped"], "successes": int(np.sum(np.asarray(success)[weighted.keep]))}
        solved = [t for t in t_star if t is not None]
        gen = cfg.generation()
        return output.finish(
            counts, None if recorded else models.identity(models.resolve(cfg.model, cfg.trust_remote_code)),
            provenance(cfg, run.ingest, run.cache, run.timings),
            weights={**asdict(wcfg), **ws},
            returns={**asdict(rcfg), "mean": float(np.mean(returns)) if returns else None,
                     "success_rate": float(np.mean(success)) if success else None,
                     "t_star": {str(t): solved.count(t) for t in sorted(set(solved))}},
            rollout={k: v for k, v in asdict(cfg.rollout()).items() if k != "generation"},
            generation=None if recorded else {**asdict(gen), "engine": generation.resolve_engine(gen)})

    @staticmethod
    def summary(manifest: dict, out: str) -> str:
        c, w = manifest["counts"], manifest["weights"]
        ess = f"{w['ess']:.1f} of {c['sft']}" if c["sft"] else "n/a"
        return (f"drift: {c['sft']} weighted trajectories from {c['prompts']} of {c['input']} records "
                f"({c['successes']} successful; ESS {ess}); all-fail groups {w['groups_all_fail']} "
                f"({w['all_fail']}: {c['prompts_dropped']} records dropped), clipped {w['clipped']}; "
                f"quarantined {c['quarantined']}, duplicates {c['duplicates']}\n"
                f"  {out}/sft/  {out}/quarantine/  {out}/manifest.json")


def run_drift(cfg: DriftConfig) -> dict:
    """Run the drift job (see DriftJob); its manifest."""
    return DriftJob(cfg).run()


def _write_sft(shards, weighted: W.Weighted, group_of: dict, rcfg: ReturnConfig, recorded: bool,
               output: JobOutput) -> int:
    """Pass 2: rows with their weights, work shard i -> sft/part-i, and the rollout stage's rejects into
    the quarantine. Returns the number of records that kept rows."""
    target = schema.arrow_schema(DRIFT)
    cursor, prompts = 0, 0
    for i, (ing_path, rol_path, sig_paths) in enumerate(shards):
        records, rollout = read_arrow(ing_path), read_arrow(rol_path)
        for row in _rollout_quarantine(records, rollout):
            output.quarantine.write(row)
        signals = signal_columns(sig_paths)
        if signals is not None:
            schema.check_declared(signals.column_names, DRIFT)
        kept = []
        for row in shard_rows(records, rollout, rcfg, recorded, signals):
            if weighted.keep[cursor]:
                row.update(group_id=group_of[row["prompt_id"]], weight=float(weighted.weight[cursor]),
                           ess=float(weighted.group_ess[cursor]))
                kept.append(row)
            cursor += 1
        prompts += len({r["id"] for r in kept})
        if kept:
            output.write_part("sft", i, pa.Table.from_pylist(kept, schema=target))
    return prompts


def _records_with_rows(shards) -> int:
    """Records that produced trajectories (not quarantined by the rollout stage)."""
    return sum(read_arrow(r, ["rollout_error"]).column("rollout_error").null_count for _, r, _ in shards)
