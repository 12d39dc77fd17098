"""`curate route`: re-route a finished prism run from its cache (new metric, quantile or threshold; no
gradients), trusting nothing it reads: every file state.json names must be the one its stage committed."""

from __future__ import annotations

import logging
from pathlib import Path

from curate.config import PrismConfig
from curate.engine.shards import ingest_key, marker
from curate.ingest.ingest import input_fingerprint
from curate.io import folders, readers
from curate.io.atomic import check_state_paths, file_sha256, read_json
from curate.jobs.prism import STATE, route_and_report


log = logging.getLogger(__name__)
class StaleCache(ValueError):
    """The work folder's shards are not the ones its state.json describes (exit code 2)."""


def reroute(work: str | Path, out: str | Path, route_cfg) -> dict:
    """Re-route from cached probe columns: new metric or threshold, no gradients. Holds the locks of
    OUT and WORK; StaleCache when the cache no longer matches state.json (see check_cache)."""
    work, out = Path(work).resolve(), Path(out)
    path = work / STATE
    if not work.is_dir() and not folders.staging_path(out.resolve()).exists():  # (a killed switch may hold it)
        raise FileNotFoundError(f"{work}: no such work folder")
    with folders.job_folders(out.resolve(), work, ()):
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
        return route_and_report(state, route_cfg, out)


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
    ingest_done = work / "ingest" / "ingest.done.json"
    if not ingest_done.is_file() or read_json(ingest_done).get("key") != ing["key"]:
        raise StaleCache(f"{ingest_done}: the ingest shards were rewritten after the prism run that wrote {work / STATE} "
                         "(a later run on this work folder, perhaps killed); rerun `curate prism` first")
    entries = [(e, None) for e in ing["shards"]]
    for stage in ("tokenize", "probe"):
        entries += [(e, stage) for e in state[stage]]
    for name, shards in state.get("signals", {}).items():
        entries += [(e, name) for e in shards]
    for entry, stage in entries:
        path = Path(entry["path"])
        done = read_json(marker(path)) if stage and marker(path).is_file() else None
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
        key = ingest_key(icfg, files)
    except (OSError, ValueError, TypeError, readers.UnreadableFile) as e:
        log.warning(f"the inputs of the cached run cannot be checked ({e}); routing the cache as it is")
        return
    if key != state["ingest"]["key"]:
        then = {f["path"]: f.get("sha256") for f in state["ingest"].get("files", [])}
        now = {f["path"]: f.get("sha256") for f in files if "skipped" not in f}
        changed = sorted(p for p in then.keys() | now.keys() if then.get(p) != now.get(p))
        what = f"the input {', '.join(changed[:3])}" if changed else \
            f"the inputs {', '.join(state['config']['input'])} (their listing, options or curate's ingest rules)"
        raise StaleCache(f"{what} changed since the prism run that made this cache; rerun `curate prism` to route them")

