"""The irft job: ingest -> continuation (ỹ from the generator) -> pair_scores -> OUT/pairs/.

IRFT (Li et al., NeurIPS 2024) contrasts each demonstration y with the policy's own reply ỹ through the
implicit reward r = beta * log(pi(y|x) / pi_ref(y|x)); one stage is SPIN. The T stages of the method are
T runs of this job: stage t generates ỹ for its chunk of the prompts with the checkpoint the user trained
after stage t-1 (`--stage t --model CKPT`). Both per-shard stages are cached like the probe; beta and the
identical-pair filter are applied when the pairs are written, so they cost nothing to change. Beside
OUT/pairs/: OUT/stage_index/ (every record's stage) and OUT/quarantine/."""

from __future__ import annotations

import time
from dataclasses import asdict

import pyarrow as pa

from curate import generation, models
from curate.config import IrftConfig
from curate.corpus.pairs import PAIRS, WinRate, pair_rows
from curate.corpus.routing import signal_columns
from curate.engine.outputs import JobOutput, provenance
from curate.io.atomic import read_arrow
from curate.io.quarantine import quarantine_row
from curate.jobs.base import INGEST, Job, StageRun
from curate.stages.continuation import Continuation
from curate.stages.pair_scores import PairScores

STAGE_INDEX = "stage_index/part-00000.arrow"


class IrftJob(Job):
    """`curate irft`: the generator's reply to each demonstration's prompt, log-probs under the policy and
    the reference, implicit rewards and optional reward-model scores -> DPO pairs in OUT/pairs/."""

    name = "irft"
    config = IrftConfig
    partitions = (PAIRS, "stage_index")
    balance = ("pairs", "identical", "other_stages", "quarantined", "duplicates")

    def stages(self):
        return [(Continuation(self.cfg.continuation()), INGEST), (PairScores(self.cfg.pair_scores()), "continuation")]

    def corpus(self, run: StageRun) -> dict:
        cfg, t = self.cfg, time.perf_counter()
        generator = models.resolve(cfg.model, cfg.trust_remote_code).name
        signals = [stage.name for stage in self.signals()]
        counts, stage_index = {"pairs": 0, "identical": 0, "other_stages": 0}, []
        implicit, rm = WinRate(), WinRate()
        shards = zip(run.ingest["shards"], run.shards["continuation"], run.shards["pair_scores"])
        with JobOutput(IrftJob, cfg.out_dir, run.ingest["quarantine"]) as output:
            for i, (s_ing, s_cont, s_scr) in enumerate(shards):
                records, c_tab = read_arrow(s_ing["path"]), read_arrow(s_cont["path"])
                stage_index.append(pa.table({**{k: records.column(k) for k in ("id", "source", "source_index")},
                                             "stage": c_tab.column("stage")}))
                for rec, err in zip(records.to_pylist(), c_tab.column("pair_error").to_pylist()):
                    if err is not None:
                        output.quarantine.write(quarantine_row(rec, "continuation", err))
                valid = c_tab.column("pair_error").null_count
                rows, dropped = pair_rows(records, c_tab, read_arrow(s_scr["path"]), cfg.stage, cfg.beta, generator,
                                          signal_columns(run.signal_paths(signals, i)))
                counts["identical"] += dropped
                counts["other_stages"] += valid - rows.num_rows - dropped
                if rows.num_rows:
                    output.write_part(PAIRS, i, rows)
                    counts["pairs"] += rows.num_rows
                    implicit.add(rows.column("implicit_reward_chosen"), rows.column("implicit_reward_rejected"))
                    rm.add(rows.column("rm_score_chosen"), rows.column("rm_score_rejected"))
            output.write_file(STAGE_INDEX, pa.concat_tables(stage_index) if stage_index else pa.table({}))
        run.timings["pairs"] = time.perf_counter() - t

        ic = run.ingest["counts"]
        counts = {"input": ic["input"], "duplicates": ic["duplicates"], "quarantined": output.quarantine.count,
                  **counts}
        has_rm = cfg.reward_model is not None
        return output.finish(
            counts, models.identity_of(cfg.model, cfg.trust_remote_code),
            provenance(cfg, run.ingest, run.cache, run.timings),
            stage={"index": cfg.stage, "of": cfg.stages, "beta": cfg.beta},
            win_rates={"implicit_reward": implicit.summary(), "reward_model": rm.summary() if has_rm else None},
            generation={**asdict(cfg.generation()), "engine": generation.resolve_engine(cfg.generation())},
            ref_model=models.identity_of(cfg.ref_model or cfg.model, cfg.trust_remote_code),
            reward_model=models.identity_of(cfg.reward_model, cfg.trust_remote_code) if has_rm else None)

    @staticmethod
    def summary(manifest: dict, out: str) -> str:
        c, s, w = manifest["counts"], manifest["stage"], manifest["win_rates"]
        return (f"irft stage {s['index']} of {s['of']}: {c['pairs']} pairs from {c['input']} records "
                f"(identical dropped {c['identical']}, other stages {c['other_stages']}, quarantined "
                f"{c['quarantined']}, duplicates {c['duplicates']}); demonstration wins: implicit reward "
                f"{_rate(w['implicit_reward'])}, reward model {_rate(w['reward_model'])}\n"
                f"  {out}/pairs/  {out}/stage_index/  {out}/quarantine/  {out}/manifest.json")


def _rate(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['demo_wins']:.0%} (ties {r['ties']:.0%})"


def run_irft(cfg: IrftConfig) -> dict:
    """Run the irft job (see IrftJob); its manifest."""
    return IrftJob(cfg).run()
