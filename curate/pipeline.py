"""Runs the prism job: ingest -> tokenize -> probe over shards with an executor, then route.

Each per-shard result is cached under WORK/<stage>/part-NNNNN.arrow with a `.done.json` marker written
after the file is complete. The marker holds the cache key, a hash of (stage identity, input shard's
sha256), so a finished shard is never redone, a changed config or model recomputes, and a killed run
resumes where it stopped."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from curate import models
from curate.config import PrismConfig
from curate.executors import make_executor
from curate.io import output, readers, routed
from curate.io.atomic import (check_state_paths, clean_stale_temps, file_sha256, jsonl_writer, read_arrow, read_json,
                              stable_hash, write_arrow, write_json)
from curate.report import try_write_report
from curate.stages.base import Stage
from curate.stages.ingest import ingest, input_fingerprint, not_read
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
    # a marker copied with its folder (cp -a OUT COPY) names the original's file: recompute, never read it
    return done if done.get("key") == key and done.get("path") == str(target) else None


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
    done = read_json(marker) if not cfg.force and marker.exists() else {}
    here = all(Path(sh["path"]).parent == folder for sh in done.get("shards", []))  # not a copied folder's
    if done.get("key") == key and here:
        if "not_read" in done:  # hidden files and curate's own folders come and go without changing the key
            fresh = not_read(icfg)
            failures = [e for e in done["skipped"] if e not in done["not_read"]]
            done = {**done, "skipped": failures + fresh, "not_read": fresh}
        return done, {"computed": 0, "cached": 1}
    shards = []
    marker.unlink(missing_ok=True)  # shards are about to be rewritten: no marker may vouch for them meanwhile

    def write_shard(i: int, table: pa.Table) -> None:
        path = folder / f"part-{i:05d}.arrow"
        shards.append({"path": str(path), "sha256": write_arrow(path, table), "rows": table.num_rows})

    with jsonl_writer(folder / "quarantine.jsonl") as quarantine:  # streamed: bad records can be many
        res = ingest(icfg, write_shard, quarantine.write, files)
    _remove_parts_beyond(folder, len(shards))
    done = {"key": key, "shards": shards, "counts": res.counts, "files": res.files, "skipped": res.skipped,
            "not_read": not_read(icfg), "notes": res.notes, "quarantine": str(folder / "quarantine.jsonl"),
            "quarantine_sha256": file_sha256(folder / "quarantine.jsonl")}
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
    """The whole job, holding the locks of OUT and WORK (io.output); returns the manifest it wrote."""
    Probe(cfg.probe()).describe()  # a model the architecture map refuses stops here: no folder is touched
    with output.job_folders(Path(cfg.out).resolve(), cfg.work_dir, cfg.input):
        return _run_prism(cfg)


def _run_prism(cfg: PrismConfig) -> dict:
    work = cfg.work_dir
    clean_stale_temps(work)
    # the shards are about to change: `curate route` must not trust this state again until it is rewritten
    (work / STATE).unlink(missing_ok=True)
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
             "model": probe.identity()["config"]["model"], "modules": prb[0]["modules"] if prb else [],
             "probe_map": prb[0].get("probe_map") if prb else None,
             "timings": timings, "cache": cache}
    write_json(work / STATE, state)
    return _route_and_report(state, cfg.route(), Path(cfg.out))


def _route_and_report(state: dict, route_cfg, out: Path) -> dict:
    try:
        manifest = routed.write(state, route_cfg, out.resolve())
    except routed.NothingRouted:
        try_write_report(out)
        raise
    try_write_report(out)  # after the data and manifest are committed: a failure only warns
    return manifest


class StaleCache(ValueError):
    """The work folder's shards are not the ones its state.json describes (exit code 2)."""


def reroute(work: str | Path, out: str | Path, route_cfg) -> dict:
    """Re-route from cached probe columns: new metric or threshold, no gradients. Holds the locks of
    OUT and WORK; StaleCache when the cache no longer matches state.json (see check_cache)."""
    work, out = Path(work).resolve(), Path(out)
    path = work / STATE
    if not work.is_dir() and not output.staging_path(out.resolve()).exists():  # (a killed switch may hold it)
        raise FileNotFoundError(f"{work}: no such work folder")
    with output.job_folders(out.resolve(), work, ()):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no finished prism run in this work folder (a run started on it "
                                    "did not finish?); rerun `curate prism` first")
        try:
            state = read_json(path)
            check_cache(work, state)
        except StaleCache:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            raise StaleCache(f"{path}: not the state file of a finished prism run ({type(e).__name__}: {e}); "
                             "rerun `curate prism`") from e
        return _route_and_report(state, route_cfg, out)


def check_cache(work: Path, state: dict) -> None:
    """Trust nothing route reads: every data file state.json names lies inside WORK, and every shard is
    the one its stage committed for this state (its done marker holds the state's cache key and sha256,
    and the file has that sha256). Inputs still present must be unchanged. StaleCache saying which."""
    try:
        check_state_paths(work, state)  # a crafted state.json must not make route read elsewhere
    except ValueError as e:
        raise StaleCache(f"{e} (was the work folder moved or copied? its state names absolute paths); "
                         "rerun `curate prism` on it") from None
    ing = state["ingest"]
    quarantine = Path(ing["quarantine"])
    if "quarantine_sha256" in ing and (not quarantine.is_file() or file_sha256(quarantine) != ing["quarantine_sha256"]):
        raise StaleCache(f"{quarantine}: missing or changed since the prism run that wrote {work / STATE}; "
                         "rerun `curate prism` first")
    if any(entry.get("modules", state["modules"]) != state["modules"] for entry in state["probe"]):
        raise StaleCache(f"{work / STATE}: its module list is not the one its probe shards were computed for; "
                         "rerun `curate prism` first")
    marker = work / "ingest" / "ingest.done.json"
    if not marker.is_file() or read_json(marker).get("key") != ing["key"]:
        raise StaleCache(f"{marker}: the ingest shards were rewritten after the prism run that wrote {work / STATE} "
                         "(a later run on this work folder, perhaps killed); rerun `curate prism` first")
    entries = [(e, None) for e in ing["shards"]]
    for stage in ("tokenize", "probe"):
        entries += [(e, stage) for e in state[stage]]
    for name, shards in state.get("signals", {}).items():
        entries += [(e, name) for e in shards]
    for entry, stage in entries:
        path = Path(entry["path"])
        done = read_json(_marker(path)) if stage and _marker(path).is_file() else None
        if stage and (done is None or done.get("key") != entry["key"] or done.get("sha256") != entry["sha256"]):
            raise StaleCache(f"{path}: the {stage} shard was recomputed or removed after the prism run that wrote "
                             f"{work / STATE}; rerun `curate prism` first")
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise StaleCache(f"{path}: missing or changed since the prism run that wrote {work / STATE}; "
                             "rerun `curate prism` first")
    _check_inputs(state)


def _check_inputs(state: dict) -> None:
    """The inputs, where they still exist, are the ones the cache was made from (route can run after
    the raw data was moved away: the cache holds every record)."""
    try:
        icfg = PrismConfig(**state["config"]).ingest()
        files = input_fingerprint(icfg)
        key = stable_hash([icfg.cache_fields(), files])
    except (OSError, ValueError, TypeError, readers.UnreadableFile) as e:
        print(f"curate: warning: the inputs of the cached run cannot be checked ({e}); routing the cache as it is",
              file=sys.stderr)
        return
    if key != state["ingest"]["key"]:
        then = {f["path"]: f.get("sha256") for f in state["ingest"].get("files", [])}
        now = {f["path"]: f.get("sha256") for f in files if "skipped" not in f}
        changed = sorted(p for p in then.keys() | now.keys() if then.get(p) != now.get(p))
        what = f"the input {', '.join(changed[:3])}" if changed else \
            f"the inputs {', '.join(state['config']['input'])} (their listing, options or curate's ingest rules)"
        raise StaleCache(f"{what} changed since the prism run that made this cache; rerun `curate prism` to route them")

