"""The prism job: ingest -> tokenize -> probe (+ signal stages) over shards, then route into sft/ and rl/.

The corpus step writes WORK/state.json (what `curate route` needs to re-route from the cache, see
jobs.reroute) and routes every probed row: the threshold is a corpus quantile of the routing score, shard i
of each partition holds the routed rows of work shard i in input order."""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from curate import roles
from curate.config import PrismConfig
from curate.corpus import route, routing
from curate.corpus.attribution import Entries
from curate.corpus.decide import decide
from curate.engine.outputs import JobOutput, provenance
from curate.io.atomic import write_json
from curate.jobs.base import INGEST, Job, NothingWritten, StageRun
from curate.stages.prefix import Prefix
from curate.stages.probe import Probe
from curate.stages.reward import Reward
from curate.stages.tokenize import Tokenize

STATE = "state.json"  # what `curate route` needs to re-route from the cache


class NothingRouted(NothingWritten):
    """Every record was quarantined or a duplicate: the output is written (its quarantine says why), and
    the job fails (exit code 2) rather than report a split of nothing."""


class PrismJob(Job):
    """`curate prism`: tokenize and probe every record, then route the probed rows into OUT/sft/ and
    OUT/rl/ (module doc)."""

    name = "prism"
    config = PrismConfig
    partitions = route.PARTITIONS
    balance = ("sft", "rl", "quarantined", "duplicates")

    def stages(self):
        return [(Tokenize(self.cfg.tokenize()), INGEST), (Probe(self.cfg.probe()), "tokenize")]

    def signals(self):
        """Prefix-RFT annotations and reward-model scores, joined into every routed row."""
        cfg = self.cfg
        stages = [] if cfg.prefix == "none" else [Prefix(cfg.prefix_rft())]
        if cfg.reward_model:
            stages.append(Reward(cfg.reward()))
        return stages

    def check(self) -> None:
        super().check()
        Probe(self.cfg.probe()).describe()  # a model the architecture map refuses stops here: no folder is touched
        self.cfg.route()                     # routing options, before hours of probing

    def prepare(self, work: Path) -> None:
        # the shards are about to change: `curate route` must not trust this state again until it is rewritten
        (work / STATE).unlink(missing_ok=True)

    def corpus(self, run: StageRun) -> dict:
        prb = run.shards["probe"]
        signals = {stage.name: run.shards[stage.name] for stage in self.signals()}
        state = {"config": asdict(self.cfg), "ingest": run.ingest, "tokenize": run.shards["tokenize"],
                 "probe": prb, "signals": signals, "model": Probe(self.cfg.probe()).identity()["config"]["model"],
                 # the map as this code describes it (a cached shard's marker may predate some of its fields)
                 "modules": prb[0]["modules"] if prb else [], "probe_map": self._probe_map(prb),
                 "timings": run.timings, "cache": run.cache}
        write_json(self.cfg.work_dir / STATE, state)
        return route_and_report(state, self.cfg.route(), Path(self.cfg.out))

    def _probe_map(self, prb: list[dict]) -> dict | None:
        if not prb:
            return None
        described = Probe(self.cfg.probe()).describe()
        if described["modules"] != prb[0]["modules"]:  # the cache key holds the modules: cannot differ
            raise RuntimeError("the probe shards measure other modules than the probe map describes")
        return described["probe_map"]

    @staticmethod
    def summary(manifest: dict, out: str) -> str:
        c, r = manifest["counts"], manifest["routing"]
        split = (f"threshold {r['threshold']:.6g}" if r["threshold"] is not None else
                 f"thresholds by {r['stratify']}: " + ", ".join(f"{k} {v:.6g}" for k, v in (r["thresholds"] or {}).items()))
        how = "".join(f", {k} {r[k]}" for k in ("control", "module_scale") if r.get(k, "none") != "none")
        warnings = "".join(f"\n  warning: {w}" for w in manifest.get("diagnostics", {}).get("warnings", []))
        return (f"routed {c['sft'] + c['rl']} of {c['input']} records by {r['metric']} ({split}{how}): "
                f"sft {c['sft']}, rl {c['rl']}; "
                f"quarantined {c['quarantined']}, duplicates {c['duplicates']}, truncated {c['truncated']}\n"
                f"  {out}/sft/  {out}/rl/  {out}/quarantine/  {out}/manifest.json"
                + (f"\n  probed {roles.summary(manifest['probe_map'])}" if manifest.get("probe_map") else "")
                + warnings)


def route_and_report(state: dict, route_cfg: route.RouteConfig, out: Path) -> dict:
    """Route the cached run `state` into OUT (the caller holds its lock); the manifest. NothingRouted
    after the switch (and the report) when no row was routed."""
    manifest = write_routed(state, route_cfg, out.resolve())
    c = manifest["counts"]
    if not c["sft"] + c["rl"]:
        raise NothingRouted(f"nothing routed: 0 of {c['input']} records (quarantined {c['quarantined']}, "
                            f"duplicates {c['duplicates']}); the reasons are in {out.resolve() / 'quarantine'}/")
    return manifest


def write_routed(state: dict, cfg: route.RouteConfig, out: Path) -> dict:
    """Route every probed row of `state` and switch the new OUT in; returns the manifest."""
    t0 = time.perf_counter()
    # Shards are independent in both passes; their numpy/arrow work and file writes release the GIL, so
    # two threads use two cores. Results are taken in shard order: the same bytes as one thread.
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    shards = list(routing.shard_paths(state))
    decision = decide(routing.corpus_features(shards, cfg, _numel(state, cfg), pool), cfg)
    entries = Entries.of(state["modules"], state.get("probe_map"))
    prefix_rows = state["config"].get("prefix", "none")
    counts, truncated, template, probe_rejects = Counter(), 0, Counter(), 0
    with pool, JobOutput(PrismJob, out, state["ingest"]["quarantine"]) as output:
        n = len(shards)
        # quarantine rows are streamed to their file in shard order (ingest's first): never all in memory
        for shard in pool.map(routing.route_shard, range(n), shards, decision.per_shard, [entries] * n,
                              [cfg.metric] * n, [prefix_rows] * n, [output] * n):
            template.update(shard.template)
            for row in shard.quarantine:
                output.quarantine.write(row)
                probe_rejects += row["stage"] == "probe"
            truncated += shard.truncated
            counts.update(shard.counts)
    ing = state["ingest"]["counts"]
    quarantined = output.quarantine.count
    counts = {"input": ing["input"], "duplicates": ing["duplicates"], "quarantined": quarantined,
              "quarantined_ingest": ing["quarantined"],
              "quarantined_tokenize": quarantined - ing["quarantined"] - probe_rejects,
              "quarantined_probe": probe_rejects, "truncated": truncated,
              **{part: counts[part] for part in route.PARTITIONS}}
    timings = {**state["timings"], "route": time.perf_counter() - t0}
    tokenize = state["tokenize"][0].get("chat_template") or {} if state["tokenize"] else {}
    return output.finish(
        counts, state["model"], provenance({**state["config"], **asdict(cfg)}, state["ingest"], state["cache"], timings),
        routing=decision.routing, diagnostics=decision.diagnostics,
        chat_template={**tokenize, "tool_rendering": _counts(template, "rendering"),
                       "unrendered": _counts(template, "unrendered")},
        modules=state["modules"], probe_map=state.get("probe_map"))


def _numel(state: dict, cfg: route.RouteConfig) -> np.ndarray | None:
    """The weights behind each grad_norms entry, for --module-scale numel (None without it)."""
    if cfg.module_scale == "none" or not state["probe"]:   # nothing probed: nothing to scale
        return None
    numel = (state.get("probe_map") or {}).get("numel")
    if not numel:
        raise ValueError("--module-scale numel needs the probe map's matrix sizes, which this cache predates; "
                         "rerun `curate prism` (the probe shards are reused)")
    return np.asarray(numel, dtype=np.float64)


def _counts(counter: Counter, kind: str) -> dict[str, int]:
    """{what: n} of the (kind, what) keys of `counter`, sorted by what."""
    return {what: n for (k, what), n in sorted(counter.items()) if k == kind}


def run_prism(cfg: PrismConfig) -> dict:
    """Run the prism job (see PrismJob); its manifest."""
    return PrismJob(cfg).run()
