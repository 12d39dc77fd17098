"""Runs the irft job: ingest -> continuation (ỹ from the generator) -> pair_scores -> OUT/pairs/.

IRFT (Li et al., NeurIPS 2024) contrasts each demonstration y with the policy's own reply ỹ through the
implicit reward r = beta * log(pi(y|x) / pi_ref(y|x)); one stage is SPIN. The T stages of the method are
T runs of this job: stage t generates ỹ for its chunk of the prompts with the checkpoint the user trained
after stage t-1 (`--stage t --model CKPT`). Both per-shard stages are cached like the probe; beta and the
identical-pair filter are applied when the pairs are written, so they cost nothing to change.

Output follows routed/: Arrow stream shards and the manifest built beside OUT and switched in as a whole,
with OUT/stage_index/ (every record's stage) and OUT/quarantine/."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import curate
from curate import generation, models, schema
from curate.config import IrftConfig
from curate.executors import make_executor
from curate.io import output
from curate.io.atomic import clean_stale_temps, jsonl_writer, read_arrow, write_arrow, write_json
from curate.io.quarantine import quarantine_row, reconcile
from curate.io.routed import provenance
from curate.pipeline import run_ingest, run_sharded, timed
from curate.report import try_write_report
from curate.stages.continuation import Continuation
from curate.stages.pair_scores import PairScores

PAIRS = "pairs"


def pair_rows(records: pa.Table, cont: pa.Table, scores: pa.Table, stage: int, beta: float,
              generator: str) -> tuple[pa.Table, int]:
    """One shard's DPO rows for `stage` (identical pairs dropped), and the number dropped."""
    mine = pc.and_(pc.equal(cont.column("stage"), stage), pc.is_valid(cont.column("prompt")))
    records, cont, scores = records.filter(mine), cont.filter(mine), scores.filter(mine)
    different = pc.not_equal(cont.column("chosen_text"), cont.column("rejected_text"))
    dropped = cont.num_rows - (pc.sum(different).as_py() or 0)
    records, cont, scores = records.filter(different), cont.filter(different), scores.filter(different)
    n = records.num_rows
    logp = {c: scores.column(c).to_numpy() for c in ("chosen_logps", "rejected_logps", "ref_chosen_logps",
                                                     "ref_rejected_logps")}
    cols = {
        **{c: records.column(c) for c in ("id", "source", "source_index")},
        "prompt": cont.column("prompt"), "chosen": cont.column("chosen"),
        "rejected": reply(cont.column("rejected_text")), "tools": cont.column("tools"), "stage": cont.column("stage"),
        "generator": [generator] * n, **logp,
        "implicit_reward_chosen": beta * (logp["chosen_logps"] - logp["ref_chosen_logps"]),
        "implicit_reward_rejected": beta * (logp["rejected_logps"] - logp["ref_rejected_logps"]),
        "logp_gap": logp["chosen_logps"] - logp["rejected_logps"],
        **{c: scores.column(c) for c in ("rm_score_chosen", "rm_score_rejected", "chosen_len_tokens",
                                          "rejected_len_tokens")},
    }
    target = schema.arrow_schema(PAIRS)
    return pa.table({name: cols[name] for name in target.names}).cast(target), dropped


def reply(texts: pa.ChunkedArray) -> pa.Array:
    return pa.array([[{"role": "assistant", "content": t}] for t in texts.to_pylist()], schema.MESSAGES)


class WinRate:
    """Running share of pairs where the demonstration scores higher than the generation (ties apart):
    counts, not every score, so the corpus pass stays in bounded memory."""

    def __init__(self):
        self.pairs = self.wins = self.ties = 0
        self.margin = 0.0

    def add(self, chosen: pa.ChunkedArray, rejected: pa.ChunkedArray) -> None:
        c = chosen.to_numpy(zero_copy_only=False).astype(np.float64)
        r = rejected.to_numpy(zero_copy_only=False).astype(np.float64)
        self.pairs += len(c)
        self.wins += int(np.sum(c > r))
        self.ties += int(np.sum(c == r))
        self.margin += float(np.sum(c - r))

    def summary(self) -> dict | None:
        if not self.pairs:
            return None
        return {"demo_wins": self.wins / self.pairs, "ties": self.ties / self.pairs, "pairs": self.pairs,
                "mean_margin": self.margin / self.pairs}


def run_irft(cfg: IrftConfig) -> dict:
    """The whole job, holding the locks of OUT and WORK (io.output); returns the manifest it wrote."""
    with output.job_folders(Path(cfg.out).resolve(), cfg.work_dir, cfg.input):
        return _run_irft(cfg)


def _run_irft(cfg: IrftConfig) -> dict:
    work, out = cfg.work_dir, Path(cfg.out).resolve()
    clean_stale_temps(work)
    cont_stage, score_stage = Continuation(cfg.continuation()), PairScores(cfg.pair_scores())
    executor = make_executor(cfg.workers, cfg.scheduler)
    timings, cache = {}, {}
    gpu = models.resolve_device(cfg.device) == "cuda"
    try:
        with timed(timings, "ingest"):
            ing, cache["ingest"] = run_ingest(cfg, work / "ingest")
        with timed(timings, "continuation"):
            cont, cache["continuation"] = run_sharded(cont_stage, ing["shards"], work / "continuation", executor,
                                                      cfg.force, gpu=gpu)
        with timed(timings, "pair_scores"):
            scr, cache["pair_scores"] = run_sharded(score_stage, cont, work / "pair_scores", executor,
                                                    cfg.force, gpu=gpu)
    finally:
        executor.close()
    t = time.perf_counter()
    generator = models.resolve(cfg.model, cfg.trust_remote_code).name
    staging = output.new_staging(out)
    files, digests, counts, stage_index = [], {}, {"pairs": 0, "identical": 0, "other_stages": 0}, []
    implicit, rm = WinRate(), WinRate()
    with jsonl_writer(staging / "quarantine" / "part-00000.jsonl") as quarantine:
        quarantine.copy_lines(ing["quarantine"])
        for i, (s_ing, s_cont, s_scr) in enumerate(zip(ing["shards"], cont, scr)):
            records, c_tab = read_arrow(s_ing["path"]), read_arrow(s_cont["path"])
            stage_index.append(pa.table({**{k: records.column(k) for k in ("id", "source", "source_index")},
                                         "stage": c_tab.column("stage")}))
            for rec, err in zip(records.to_pylist(), c_tab.column("pair_error").to_pylist()):
                if err is not None:
                    quarantine.write(quarantine_row(rec, "continuation", err))
            valid = c_tab.column("pair_error").null_count
            rows, dropped = pair_rows(records, c_tab, read_arrow(s_scr["path"]), cfg.stage, cfg.beta, generator)
            counts["identical"] += dropped
            counts["other_stages"] += valid - rows.num_rows - dropped
            if rows.num_rows:
                name = f"{PAIRS}/part-{i:05d}.arrow"
                digests[name] = write_arrow(staging / name, rows)
                files.append(name)
                counts["pairs"] += rows.num_rows
                implicit.add(rows.column("implicit_reward_chosen"), rows.column("implicit_reward_rejected"))
                rm.add(rows.column("rm_score_chosen"), rows.column("rm_score_rejected"))
    digests["stage_index/part-00000.arrow"] = write_arrow(
        staging / "stage_index" / "part-00000.arrow", pa.concat_tables(stage_index) if stage_index else pa.table({}))
    (staging / PAIRS).mkdir(exist_ok=True)
    timings["pairs"] = time.perf_counter() - t

    ic = ing["counts"]
    counts = {"input": ic["input"], "duplicates": ic["duplicates"], "quarantined": quarantine.count, **counts}
    reconcile(counts, "pairs", "identical", "other_stages", "quarantined", "duplicates")
    has_rm = cfg.reward_model is not None
    manifest = {
        "curate_version": curate.__version__,
        "job": "irft",
        "counts": counts,
        "stage": {"index": cfg.stage, "of": cfg.stages, "beta": cfg.beta},
        "win_rates": {
            "implicit_reward": implicit.summary(),
            "reward_model": rm.summary() if has_rm else None},
        "generation": {**asdict(cfg.generation()), "engine": generation.resolve_engine(cfg.generation())},
        "files": {PAIRS: files, "stage_index": ["stage_index/part-00000.arrow"]},
        "sha256": digests,
        "model": models.identity_of(cfg.model, cfg.trust_remote_code),
        "ref_model": models.identity_of(cfg.ref_model or cfg.model, cfg.trust_remote_code),
        "reward_model": models.identity_of(cfg.reward_model, cfg.trust_remote_code) if has_rm else None,
        **provenance(cfg, ing, cache, timings),
    }
    write_json(staging / "manifest.json", manifest)
    output.commit(out)
    try_write_report(cfg.out)  # after the data and manifest are committed: a failure only warns
    return manifest
