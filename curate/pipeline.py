"""Runs the prism job: ingest -> tokenize -> probe over shards with an executor, then route.

Each per-shard result is cached under WORK/<stage>/part-NNNNN.arrow with a `.done.json` marker written
after the file is complete. The marker holds the cache key, a hash of (stage identity, input shard's
sha256), so a finished shard is never redone, a changed config or model recomputes, and a killed run
resumes where it stopped."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from curate import models
from curate.config import PrismConfig
from curate.executors import make_executor
from curate.io import routed
from curate.io.atomic import check_state_paths, clean_stale_temps, jsonl_writer, read_arrow, read_json, stable_hash, write_arrow, write_json
from curate.report import try_write_report
from curate.stages.base import Stage
from curate.stages.ingest import ingest, input_fingerprint
from curate.stages.probe import Probe
from curate.stages.tokenize import Tokenize

STATE = "state.json"  # what `curate route` needs to re-route from the cache


@dataclass(frozen=True)
class ShardTask:
    stage: Stage
    source: str       # upstream shard file
    target: str       # this stage's shard file
    key: str


def run_task(task: ShardTask) -> dict:
    """Run one stage on one shard and commit it: data file first, then its done marker."""
    shard = read_arrow(task.source, list(task.stage.reads))
    # the file is about to change: its old marker (another config's) must not outlive it if we are killed
    _marker(task.target).unlink(missing_ok=True)
    sha = write_arrow(task.target, task.stage.run(shard))
    done = {"key": task.key, "path": task.target, "sha256": sha, "rows": shard.num_rows,
            **task.stage.describe()}
    write_json(_marker(task.target), done)
    return done


def _marker(shard_path: str | Path) -> Path:
    return Path(str(shard_path).removesuffix(".arrow") + ".done.json")


def _cached(target: Path, key: str, force: bool) -> dict | None:
    marker = _marker(target)
    if force or not (marker.exists() and target.exists()):
        return None
    done = read_json(marker)
    return done if done.get("key") == key else None


def run_sharded(stage: Stage, upstream: list[dict], folder: Path, executor, force: bool, gpu: bool = False):
    """Results for every upstream shard, computing only those without a valid cached result."""
    identity = stage.identity()
    results, pending = [None] * len(upstream), []
    for i, up in enumerate(upstream):
        target = folder / f"part-{i:05d}.arrow"
        key = stable_hash([identity, up["sha256"]])
        results[i] = _cached(target, key, force)
        if results[i] is None:
            pending.append((i, ShardTask(stage, up["path"], str(target), key)))
    for (i, _), done in zip(pending, executor.map(run_task, [t for _, t in pending], desc=stage.name, gpu=gpu)):
        results[i] = done
    _remove_parts_beyond(folder, len(upstream))
    return results, {"computed": len(pending), "cached": len(upstream) - len(pending)}


def _remove_parts_beyond(folder: Path, n: int) -> None:
    for p in folder.glob("part-*"):
        if int(p.name[5:10]) >= n:
            p.unlink()


def run_ingest(cfg: PrismConfig, folder: Path) -> tuple[dict, dict]:
    """Ingest is all-or-nothing (it is fast and it defines the shards); its marker lists the shards."""
    icfg = cfg.ingest()
    files = input_fingerprint(icfg)
    key = stable_hash([icfg.cache_fields(), files])
    marker = folder / "ingest.done.json"
    if not cfg.force and marker.exists() and read_json(marker)["key"] == key:
        return read_json(marker), {"computed": 0, "cached": 1}
    shards = []
    marker.unlink(missing_ok=True)  # shards are about to be rewritten: no marker may vouch for them meanwhile

    def write_shard(i: int, table: pa.Table) -> None:
        path = folder / f"part-{i:05d}.arrow"
        shards.append({"path": str(path), "sha256": write_arrow(path, table), "rows": table.num_rows})

    with jsonl_writer(folder / "quarantine.jsonl") as quarantine:  # streamed: bad records can be many
        res = ingest(icfg, write_shard, quarantine.write, files)
    _remove_parts_beyond(folder, len(shards))
    done = {"key": key, "shards": shards, "counts": res.counts, "files": res.files, "skipped": res.skipped,
            "notes": res.notes, "quarantine": str(folder / "quarantine.jsonl")}
    write_json(marker, done)
    return done, {"computed": 1, "cached": 0}


@contextmanager
def timed(timings: dict, name: str):
    """Wall seconds of a block into timings[name] (the manifest's timings_s)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


def run_prism(cfg: PrismConfig) -> dict:
    """The whole job; returns the manifest it wrote."""
    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(work)
    probe = Probe(cfg.probe())
    cfg.route()  # validate routing options before hours of probing
    executor = make_executor(cfg.workers, cfg.scheduler)
    timings, cache = {}, {}
    try:
        with timed(timings, "ingest"):
            ing, cache["ingest"] = run_ingest(cfg, work / "ingest")
        with timed(timings, "tokenize"):
            tok, cache["tokenize"] = run_sharded(Tokenize(cfg.tokenize()), ing["shards"], work / "tokenize",
                                                 executor, cfg.force)
        with timed(timings, "probe"):
            gpu = models.resolve_device(cfg.device) == "cuda"
            prb, cache["probe"] = run_sharded(probe, tok, work / "probe", executor, cfg.force, gpu=gpu)
        signals = {}   # optional signal stages on the records: name -> shard results
        for stage in cfg.signal_stages():
            with timed(timings, stage.name):
                signals[stage.name], cache[stage.name] = run_sharded(stage, ing["shards"], work / stage.name,
                                                                     executor, cfg.force, gpu=gpu and stage.runs_model)
    finally:
        executor.close()
    state = {"config": asdict(cfg), "ingest": ing, "tokenize": tok, "probe": prb, "signals": signals,
             "model": probe.identity()["model"], "modules": prb[0]["modules"] if prb else [],
             "timings": timings, "cache": cache}
    write_json(work / STATE, state)
    manifest = routed.write(state, cfg.route(), Path(cfg.out))
    try_write_report(cfg.out)  # after the data and manifest are committed: a failure only warns
    return manifest


def reroute(work: str | Path, out: str | Path, route_cfg) -> dict:
    """Re-route from cached probe columns: new metric or threshold, no gradients."""
    path = Path(work) / STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no finished prism run in this work folder")
    check_state_paths(work, read_json(path))  # a crafted state.json must not make route read elsewhere
    manifest = routed.write(read_json(path), route_cfg, Path(out))
    try_write_report(out)
    return manifest

