"""Ownership, locking and the one atomic switch of a curate output folder.

- **Locks.** Every job holds an exclusive lock on its output folder (a file `.NAME.curate.lock` beside
  it, so the lock outlives the folder's swap) and on its work folder (`WORK/.curate.lock`) for the whole
  run; a second run on either fails at once, naming the holder. The locks are `filelock`'s OS locks
  (flock): a killed holder releases them with its process.
- **Ownership.** curate replaces or deletes only what it wrote: an existing output folder must be empty
  or a curate output (its manifest says so), a work folder empty or a curate work folder (marker
  `WORK/.curate-work`, or an older cache's ingest marker). An output folder may not be, or contain, an
  input; a work folder may not lie inside an input.
- **One switch.** A job builds its whole output (partitions, quarantine, manifest) in `.NAME.staging`
  beside OUT, then moves into it whatever of OUT it does not write itself (its cache `.work`, a user's
  own files), renames OUT to `.NAME.old` and the staging to OUT. A reader sees the old output, then for
  an instant no folder, then the new one: never partitions and a manifest of different runs. A run
  killed inside the switch is finished (or undone) by the next run on that folder (`recover`)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from filelock import FileLock, Timeout

from curate.io.atomic import OWN_TEMP

LOCK_SUFFIX = ".curate.lock"
WORK_MARKER = ".curate-work"
STAGING_MARKER = ".curate-staging"  # in a staging folder until its switch: tells it from a user's folder
# Everything a curate job writes at the top of an output folder. These are replaced by a new run; any
# other entry (the default cache .work, a user's file) is carried over into the new output.
OUTPUT_ENTRIES = frozenset({"sft", "rl", "pairs", "stage_index", "quarantine", "manifest.json", "report.html"})
# Entries older versions of curate left inside OUT while swapping; removed on sight.
LEGACY_ENTRIES = (".staging", ".old-sft", ".old-rl", ".old-pairs", ".old-stage_index", ".old-quarantine")


class FolderInUse(Exception):
    """Another curate run holds the folder's lock (exit code 2)."""


class NotOurs(ValueError):
    """A folder curate would write into is not its own, or would overwrite an input (exit code 2)."""


def _holder(lock_path: Path) -> str:
    try:
        h = json.loads(lock_path.read_text())
        return f"pid {h['pid']} on {h['host']}, since {h['started']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def locked(lock_path: Path, folder: Path, option: str) -> Iterator[None]:
    """Hold an exclusive lock at `lock_path` for the block; FolderInUse at once if another process has it.
    The holder (pid, host, start time, command line) is written into the lock file for that message."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderInUse(f"{option} {folder} is in use by another curate run ({_holder(lock_path)}); "
                          "wait for it to finish or choose another folder") from None
    try:
        lock_path.write_text(json.dumps({
            "pid": os.getpid(), "host": platform.node(), "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        yield
    finally:
        lock.release()


def output_lock_path(out: Path) -> Path:
    """The lock file of output folder `out`: `.NAME.curate.lock` beside it, so it outlives the folder's swap."""
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(out: Path | None, work: Path | None, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse an output that is, or holds, an input (its switch would replace the user's data) and a work
    folder inside an input where the readers would take its shards for data (they skip hidden folders,
    such as the default OUT/.work, and curate outputs), and a path that is not valid UTF-8 (it could not
    be written into a manifest). NotOurs naming both paths."""
    for option, path in (("--out", out), ("--work", work)):
        if path is not None and _not_utf8(path):
            raise NotOurs(f"{option} {ascii(str(path))}: the name is not valid UTF-8 text; choose another")
    if out is not None and work is not None and out == work:
        raise NotOurs(f"--work {work} is the output folder itself; leave --work out (default: OUT/.work)")
    for raw in inputs:
        src = Path(raw).resolve()
        if out is not None and _within(src, out):
            raise NotOurs(f"--out {out} would replace the input {raw}; choose an output folder outside it")
        if work is not None and _within(work, src):
            hidden = any(part.startswith(".") for part in work.relative_to(src).parts)
            if not hidden:
                raise NotOurs(f"--work {work} lies inside the input {raw}, whose files would be read as "
                              "data; choose a work folder outside it")


def _not_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def is_curate_output(folder: Path, export: bool = False) -> bool:
    """An output folder curate may replace: missing, empty, a finished output of the same kind (a job's
    manifest names curate's version; an export's has an "export" block) or one left by a run killed
    before its first switch (only a cache in it)."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    entries = {p.name for p in folder.iterdir() if not OWN_TEMP.match(p.name)}
    if not entries - {".work", *LEGACY_ENTRIES}:
        return True
    manifest = _manifest(folder / "manifest.json")
    if manifest is None:
        return False
    return "export" in manifest if export else "curate_version" in manifest and "export" not in manifest


def claim_output(out: Path, export: bool = False) -> None:
    """NotOurs unless `out` is a folder curate may replace (see is_curate_output)."""
    if not is_curate_output(out, export):
        kind = "curate export" if export else "curate output"
        what = "a file" if out.exists() and not out.is_dir() else f"a folder that is not a {kind}"
        raise NotOurs(f"--out {out} is {what} (no manifest.json of one in it); curate replaces only its own "
                      "outputs: choose a new or empty folder")


def claim_work(work: Path) -> None:
    """Create (or accept) a work folder: new, empty, marked as curate's, or an older curate cache.
    NotOurs for a folder holding anything else, whose files a run could overwrite or delete."""
    if work.exists() and not work.is_dir():
        raise NotOurs(f"--work {work} is a file; choose a folder")
    marker = work / WORK_MARKER
    if work.is_dir() and not marker.exists():
        entries = {p.name for p in work.iterdir()} - {LOCK_SUFFIX}
        older_cache = (work / "ingest" / "ingest.done.json").exists() or (work / "state.json").exists()
        if entries and not older_cache:
            raise NotOurs(f"--work {work} holds files that are not a curate cache; choose a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()


@contextmanager
def job_folders(out: Path, work: Path | None, inputs: Sequence[str | os.PathLike] = (),
                export: bool = False) -> Iterator[None]:
    """What every job does first: check the folders, lock output and work, recover a killed switch.
    `export`: OUT is an export folder (all of it is the export's: nothing is carried over)."""
    check_paths(out, work, inputs)
    with locked(output_lock_path(out), out, "--out"):
        if out.exists():
            claim_output(out, export)  # before recovery moves anything: a folder not ours is left as it is
        recover(out, carry=not export)
        claim_output(out, export)
        for leftover in (staging_path(out), _old_path(out)):
            if leftover.exists() or leftover.is_symlink():
                raise NotOurs(f"{leftover} exists and is not curate's (curate would use that name while it "
                              f"switches in {out}); move it away")
        if work is None:
            yield
            return
        claim_work(work)
        with locked(work / LOCK_SUFFIX, work, "--work"):
            yield


def staging_path(out: Path) -> Path:
    """Where `out`'s next output is built before its switch: `.NAME.staging` beside it."""
    return out.parent / f".{out.name}.staging"


def _old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def new_staging(out: Path) -> Path:
    """An empty staging folder for `out`'s next output, marked as curate's (call under the output lock,
    after `recover`, which removed any staging of curate's: a folder there now is not ours)."""
    staging = staging_path(out)
    staging.mkdir(parents=True)
    (staging / STAGING_MARKER).touch()
    return staging


def _ours_staging(staging: Path) -> bool:
    """A staging folder curate made: marked, or complete (the marker is removed just before the switch)."""
    return staging.is_dir() and not staging.is_symlink() and (
        (staging / STAGING_MARKER).is_file() or _manifest(staging / "manifest.json") is not None)


def _manifest(path: Path) -> dict | None:
    """A curate manifest (a job's or an export's) read from `path`; None for anything else."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(manifest, dict) and ("curate_version" in manifest or "export" in manifest)
    return manifest if ours else None


def _carry_over(src: Path, dst: Path) -> None:
    """Move every entry of `src` that is not curate's (an output entry, the staging marker or a temporary
    file of atomic_path) into `dst`: renames, no copying."""
    for entry in sorted(src.iterdir()):
        if entry.name in OUTPUT_ENTRIES or entry.name in LEGACY_ENTRIES or entry.name == STAGING_MARKER \
                or OWN_TEMP.match(entry.name):
            continue
        if not (dst / entry.name).exists() and not (dst / entry.name).is_symlink():
            entry.rename(dst / entry.name)


def commit(out: Path, carry: bool = True) -> None:
    """Switch the finished staging folder in as `out` (see the module's docstring); the caller holds the
    output lock and has written everything, manifest.json last, into `staging_path(out)`. `carry`: move
    the entries of the old OUT that are not curate outputs (cache, a user's files) into the new one."""
    staging, old = staging_path(out), _old_path(out)
    if not (staging / "manifest.json").is_file():
        raise RuntimeError(f"{staging}: no manifest.json; refusing to switch in an unfinished output")
    if old.exists() or old.is_symlink():  # recover() removed curate's own: this one is not
        raise NotOurs(f"{old} exists and is not curate's; move it away and rerun (the output is in {staging})")
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    if out.exists():
        if carry:
            _carry_over(out, staging)
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def recover(out: Path, carry: bool = True) -> None:
    """Finish or undo a switch a killed run left halfway; drop its staging (under the output lock).

    - OUT missing, `.old` present: killed between the two renames. The staging is complete (its manifest
      is written before the switch starts): rename it in; without one, put the old output back.
    - OUT present: a leftover staging is unfinished or was never switched in. What was carried into it
      (the cache, a user's files) goes back into OUT, then the staging and any `.old` are removed.
    Only folders that are curate's are touched: a staging with curate's marker or manifest, an `.old`
    that is a curate output (of the same kind)."""
    staging, old = staging_path(out), _old_path(out)
    ours_staging = _ours_staging(staging)
    # a former OUT: its cache and a user's files were carried out of it before it was renamed
    ours_old = old.is_dir() and not old.is_symlink() and (is_curate_output(old) or is_curate_output(old, True))
    if not out.exists() and not out.is_symlink() and ours_old:
        if ours_staging and (staging / "manifest.json").is_file():
            staging.rename(out)
            ours_staging = False
        else:
            old.rename(out)
            ours_old = False
    if ours_staging:
        if carry and out.is_dir():
            _carry_over(staging, out)
        shutil.rmtree(staging)
    if ours_old:
        shutil.rmtree(old)
    if out.is_dir():
        for name in LEGACY_ENTRIES:
            shutil.rmtree(out / name, ignore_errors=True)
