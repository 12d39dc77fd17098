"""The job contract: per-shard stages over the ingest shards, then one corpus step that writes OUT.

A job declares its name, its options (`config`: a config.RunOptions dataclass), the partitions it writes,
the counts that must add up to the input's (`balance`), its per-shard stages (`stages`, each with the
stage whose shards it reads) and optional per-record signal stages (`signals`: their columns join the
job's rows, declared in its row schema). `Job.run` does what every job shares: folder checks and locks,
the cached and resumable per-shard stages on an executor, timings and cache counts; the job's `corpus`
step decides over the whole corpus and writes the output through engine.outputs.JobOutput."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from curate import models
from curate.engine.executors import make_executor
from curate.engine.shards import run_ingest, run_sharded, timed
from curate.io import folders
from curate.io.atomic import clean_stale_temps
from curate.stages.base import Stage

INGEST = "ingest"
log = logging.getLogger(__name__)


class NothingWritten(ValueError):
    """Every record was quarantined or a duplicate: the output is written (its quarantine says why), and
    the job fails (exit code 2) rather than report success on nothing."""


@dataclass
class StageRun:
    """What the per-shard stages left: the ingest marker, each stage's done markers (stage name ->
    one per shard, in shard order), computed/cached counts and wall seconds per step."""

    ingest: dict
    shards: dict[str, list[dict]] = field(default_factory=dict)
    cache: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def signal_paths(self, names: list[str], i: int) -> list[str]:
        """Shard i's files of the signal stages `names`."""
        return [self.shards[name][i]["path"] for name in names]


class Job:
    """A job (module doc): a subclass declares `name`, `config`, `partitions` and `balance` and defines
    `stages`, `corpus` and `summary`; `run` runs it."""

    name: ClassVar[str]
    config: ClassVar[type]                 # its options: a config.RunOptions dataclass
    partitions: ClassVar[tuple[str, ...]]  # output folders of row shards
    balance: ClassVar[tuple[str, ...]]     # counts whose sum must equal counts["input"]

    def __init__(self, cfg):
        self.cfg = cfg

    def stages(self) -> list[tuple[Stage, str]]:
        """Per-shard stages in run order, each with the stage whose shards it reads (INGEST or an earlier
        stage's name). Building them validates their options."""
        raise NotImplementedError

    def signals(self) -> list[Stage]:
        """Per-record signal stages run on the ingest shards after `stages`; the job's rows carry their
        columns (which its row schema must declare). Add a signal to a job here."""
        return []

    def check(self) -> None:
        """Everything that can fail on the options alone, before any folder is touched."""
        self.stages()
        self.signals()

    def prepare(self, work: Path) -> None:
        """Called with the folders locked, before any stage runs."""

    def corpus(self, run: StageRun) -> dict:
        """Decide over the whole corpus, write the output (engine.outputs.JobOutput) and return its manifest."""
        raise NotImplementedError

    @staticmethod
    def summary(manifest: dict, out: str) -> str:
        """What the command line prints after a run."""
        raise NotImplementedError

    def run(self) -> dict:
        """The whole job, holding the locks of OUT and WORK (io.folders); returns the manifest it wrote."""
        self.check()
        cfg = self.cfg
        with folders.job_folders(Path(cfg.out).resolve(), cfg.work_dir, cfg.input):
            clean_stale_temps(cfg.work_dir)
            self.prepare(cfg.work_dir)
            manifest = self.corpus(self.run_stages())
        c = manifest["counts"]
        if c["input"] and c["quarantined"] + c["duplicates"] == c["input"]:
            raise NothingWritten(f"{self.name}: nothing written: each of the {c['input']} records was quarantined "
                                 f"({c['quarantined']}) or a duplicate ({c['duplicates']}); the reasons are in "
                                 f"{Path(cfg.out).resolve() / 'quarantine'}/")
        return manifest

    def run_stages(self) -> StageRun:
        """Ingest, then every stage over every shard (cached results reused), on the configured executor.
        A stage that runs a model asks for a GPU worker when the job runs on CUDA."""
        cfg, work = self.cfg, self.cfg.work_dir
        # on an existing cluster the workers' devices count, not this machine's (a head node may have no GPU):
        # model tasks ask for a GPU worker unless the job runs on CPU, if the cluster has such workers
        cuda = cfg.device != "cpu" if cfg.scheduler else models.resolve_device(cfg.device) == "cuda"
        steps = self.stages() + [(stage, INGEST) for stage in self.signals()]
        executor = make_executor(cfg.workers, cfg.scheduler, cuda)
        try:
            timings, cache = {}, {}
            with timed(timings, INGEST):
                ingest, cache[INGEST] = run_ingest(cfg, work / INGEST)
            c = ingest["counts"]
            log.info(f"{INGEST}: {c['input']} records in {len(ingest['shards'])} shards (quarantined "
                     f"{c['quarantined']}, duplicates {c['duplicates']}){' from cache' if cache[INGEST]['cached'] else ''}"
                     f", {timings[INGEST]:.1f} s")
            run = StageRun(ingest, {}, cache, timings)
            for stage, upstream in steps:
                source = ingest["shards"] if upstream == INGEST else run.shards[upstream]
                with timed(timings, stage.name):
                    run.shards[stage.name], cache[stage.name] = run_sharded(
                        stage, source, work / stage.name, executor, cfg.force, gpu=cuda and stage.runs_model)
                done = cache[stage.name]
                log.info(f"{stage.name}: {done['computed']} shards computed, {done['cached']} from cache, "
                         f"{timings[stage.name]:.1f} s")
            return run
        finally:
            executor.close()
