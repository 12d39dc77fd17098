"""Per-shard stages, cached and resumable, and the ingest step that defines the shards.

Each per-shard result is cached under WORK/<stage>/part-NNNNN.arrow with a `.done.json` marker written
after the file is complete. The marker holds the cache key, a hash of (stage identity, input shard's
sha256); the identity holds every field of the stage's config (stages.base.config_key), so a finished
shard is never redone, a changed option or model recomputes, and a killed run resumes where it stopped."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from curate.ingest.ingest import IngestConfig, ingest, input_fingerprint, not_read
from curate.io.atomic import file_sha256, jsonl_writer, read_arrow, read_json, stable_hash, write_arrow, write_json
from curate.stages.base import Stage


@dataclass(frozen=True)
class ShardTask:
    """One stage run on one upstream shard: the stage, the shard file it reads, the file it writes and the
    cache key its done marker records."""

    stage: Stage
    source: str       # upstream shard file
    target: str       # this stage's shard file
    key: str


def run_task(task: ShardTask) -> dict:
    """Run one stage on one shard and commit it: data file first, then its done marker."""
    shard = read_arrow(task.source, list(task.stage.reads))
    # the file is about to change: its old marker (another config's) must not outlive it if we are killed
    marker(task.target).unlink(missing_ok=True)
    sha = write_arrow(task.target, task.stage.run(shard))
    done = {"key": task.key, "path": task.target, "sha256": sha, "rows": shard.num_rows,
            **task.stage.describe()}
    write_json(marker(task.target), done)
    logging.getLogger(__name__).debug(f"{task.stage.name}: wrote {task.target} ({shard.num_rows} rows)")
    return done


def marker(shard_path: str | Path) -> Path:
    """The done marker of a stage's shard file."""
    return Path(str(shard_path).removesuffix(".arrow") + ".done.json")


def _cached(target: Path, key: str, force: bool) -> dict | None:
    done_path = marker(target)
    if force or not (done_path.exists() and target.exists()):
        return None
    done = read_json(done_path)
    # a marker copied with its folder (cp -a OUT COPY) names the original's file: recompute, never read it
    return done if done.get("key") == key and done.get("path") == str(target) else None


def run_sharded(stage: Stage, upstream: list[dict], folder: Path, executor, force: bool,
                gpu: bool = False) -> tuple[list[dict], dict]:
    """Results (done markers) for every upstream shard, computing only those without a valid cached result,
    and {"computed": n, "cached": n}. `upstream`: the previous stage's markers (path, sha256 each)."""
    identity = stage.identity()
    results, pending = [None] * len(upstream), []
    for i, up in enumerate(upstream):
        target = folder / f"part-{i:05d}.arrow"
        key = stable_hash([identity, up["sha256"]])
        results[i] = _cached(target, key, force)
        if results[i] is None:
            pending.append((i, ShardTask(stage, up["path"], str(target), key)))
    tasks = [t for _, t in pending]
    amounts = [stage.cost(t.source) for t in tasks]
    cost = (amounts, stage.cost_unit) if tasks and all(a is not None for a in amounts) else None
    for (i, _), done in zip(pending, executor.map(run_task, tasks, desc=stage.name, gpu=gpu, cost=cost)):
        results[i] = done
    remove_parts_beyond(folder, len(upstream))
    return results, {"computed": len(pending), "cached": len(upstream) - len(pending)}


def remove_parts_beyond(folder: Path, n: int) -> None:
    """Shards (and markers) numbered n and above: left by an earlier run over more input."""
    for p in folder.glob("part-*"):
        number = p.name[5:].split(".", 1)[0]
        if number.isdigit() and int(number) >= n:
            p.unlink()


def ingest_key(icfg: IngestConfig, files: list[dict]) -> str:
    """The ingest marker's key: its options and every input file's fingerprint."""
    return stable_hash([icfg.cache_fields(), files])


def run_ingest(cfg, folder: Path) -> tuple[dict, dict]:
    """Ingest `cfg.ingest()` into `folder` (all-or-nothing: it is fast and it defines the shards); its
    marker lists the shards. Returns (marker, {"computed", "cached"})."""
    icfg = cfg.ingest()
    files = input_fingerprint(icfg)
    key = ingest_key(icfg, files)
    done_path = folder / "ingest.done.json"
    done = read_json(done_path) if not cfg.force and done_path.exists() else {}
    here = all(Path(sh["path"]).parent == folder for sh in done.get("shards", []))  # not a copied folder's
    if done.get("key") == key and here:
        if "not_read" in done:  # hidden files and curate's own folders come and go without changing the key
            fresh = not_read(icfg)
            failures = [e for e in done["skipped"] if e not in done["not_read"]]
            done = {**done, "skipped": failures + fresh, "not_read": fresh}
        return done, {"computed": 0, "cached": 1}
    shards = []
    done_path.unlink(missing_ok=True)  # shards are about to be rewritten: no marker may vouch for them meanwhile

    def write_shard(i: int, table: pa.Table) -> None:
        path = folder / f"part-{i:05d}.arrow"
        shards.append({"path": str(path), "sha256": write_arrow(path, table), "rows": table.num_rows})

    with jsonl_writer(folder / "quarantine.jsonl") as quarantine:  # streamed: bad records can be many
        res = ingest(icfg, write_shard, quarantine.write, files)
    remove_parts_beyond(folder, len(shards))
    done = {"key": key, "shards": shards, "counts": res.counts, "files": res.files, "skipped": res.skipped,
            "not_read": not_read(icfg), "notes": res.notes, "quarantine": str(folder / "quarantine.jsonl"),
            "quarantine_sha256": file_sha256(folder / "quarantine.jsonl")}
    write_json(done_path, done)
    return done, {"computed": 1, "cached": 0}


@contextmanager
def timed(timings: dict, name: str):
    """Wall seconds of a block into timings[name] (the manifest's timings_s)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start
