"""Which input units a run reads: the paths given on the command line expanded into files and Hugging
Face `save_to_disk` folders (`scan_inputs`), with everything met and not read listed, with why.

Separate from the record reading in curate.io.readers (which re-exports the public names here): listing
looks only at names, folders and the marker files of datasets and of curate's own folders, never at
records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from curate.io.atomic import inside
from curate.io.read_errors import UnreadableFile

BASE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
SUPPORTED = BASE_SUFFIXES + tuple(s + ".gz" for s in BASE_SUFFIXES)
# Docs that sit next to data in dataset folders, by lowercase stem: README.json is not a dataset.
# (SOURCE.md, which our data folders carry, is skipped anyway: .md is not a data type.)
_SKIPPED_STEMS = ("readme", "license", "licence")
# Reasons `scan_inputs` gives for what it skips. These are curate's own or hidden things, which come and
# go between runs (lock files, caches, outputs): they are listed but are no part of ingest's cache key.
HIDDEN = "hidden (the name starts with '.')"
CURATE_OUTPUT = "a curate output folder"
CURATE_WORK = "a curate work folder"
_HF_DATASET_MARKERS = ("dataset_info.json", "state.json")
_HF_DICT_MARKER = "dataset_dict.json"


@dataclass
class Listing:
    """What `scan_inputs` found: the input units to read, and everything it did not read, with why."""

    units: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "records_read": 0}


def list_input_files(paths: Sequence[str | os.PathLike], split: str | None = None,
                     skip_bad_files: bool = False) -> list[Path]:
    """The input units of `scan_inputs` (without what it skipped)."""
    return scan_inputs(paths, split, skip_bad_files).units


def scan_inputs(paths: Sequence[str | os.PathLike], split: str | None = None,
                skip_bad_files: bool = False) -> Listing:
    """Expand files and folders (recursively) into input units, deterministically ordered.

    Within each given folder units are sorted by relative path; the given paths keep their order, and a
    unit reached twice is listed once. A Hugging Face `save_to_disk` Dataset folder is one unit; a
    DatasetDict folder gives the folder of each split read: `train` unless `split` names another
    (`"all"`: every split, in name order like any units). Its other splits are listed in
    `skipped`, as is everything else met in a folder and not read: files of another type, README /
    LICENSE files, hidden files and folders, curate's own output and work folders (so an --out inside an
    --input is never read back). Nothing is left out silently.

    Raises `UnreadableFile` for a missing path, an explicitly given file of an unsupported type, a folder
    with no input in it (silently ignoring something the user named would hide a typo), a DatasetDict
    without the split asked for, and a state file naming data outside its folder. A folder that cannot be
    listed, or a name that is not valid UTF-8, raises it too, or with `skip_bad_files` is listed in
    `skipped`. ValueError when `split` is given and no input is a DatasetDict.
    """
    scan = _Scan(split, skip_bad_files)
    for given in paths:
        path = Path(given)
        try:
            exists, is_dir = path.exists(), path.is_dir()
        except OSError as e:  # e.g. a parent folder that cannot be searched
            scan.bad(path, f"cannot read ({e.strerror or e})")
            continue
        if not exists:
            raise UnreadableFile(display_path(path), "no such file or folder")
        if not is_dir:
            if _suffix(path) is None:
                raise UnreadableFile(display_path(path), f"unsupported file type (supported: {', '.join(SUPPORTED)})")
            scan.add(path)
            continue
        scan.failed = False
        found, skipped = scan.folder(path)
        if not found and not scan.failed:  # a named folder with nothing to read is an error, not a note
            not_read = sorted(Path(s["path"]).name for s in skipped)
            raise UnreadableFile(display_path(path), f"folder has no input files (supported: {', '.join(SUPPORTED)})"
                                 + (f"; not read: {', '.join(not_read[:10])}" if not_read else ""))
        for unit in sorted(found, key=lambda p: p.as_posix()):
            scan.add(unit)
        scan.listing.skipped += sorted(skipped, key=lambda s: s["path"])
    if split is not None and not scan.dicts:
        raise ValueError(f"--split {split}: no input is a Hugging Face DatasetDict folder (dataset_dict.json), "
                         "so there is no split to choose")
    return scan.listing


def display_path(path: str | os.PathLike) -> str:
    """The path as text that can be written anywhere (JSON, Arrow, a terminal): a name that is not valid
    UTF-8 shows its bad bytes as \\xNN escapes."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


class _Scan:
    def __init__(self, split: str | None, skip_bad_files: bool):
        self.split, self.skip = split, skip_bad_files
        self.listing = Listing()
        self.seen: set[Path] = set()
        self.dicts = 0         # DatasetDict folders met
        self.failed = False    # the current given folder had an error that --skip-bad-files listed

    def add(self, unit: Path) -> None:
        """List one input unit once (by resolved path); a path that is not valid UTF-8 is refused instead
        (`bad`: UnreadableFile, or a skipped entry with --skip-bad-files)."""
        if display_path(unit) != str(unit):
            self.bad(unit, "the path is not valid UTF-8 (rename it)")
            return
        key = unit.resolve()
        if key not in self.seen:
            self.seen.add(key)
            self.listing.units.append(unit)

    def bad(self, path: Path, why: str, into: list | None = None) -> None:
        """Something that cannot be read: an error, or with --skip-bad-files an entry in `skipped`."""
        if not self.skip:
            raise UnreadableFile(display_path(path), why)
        self.failed = True
        (self.listing.skipped if into is None else into).append(_skip(path, why))

    def folder(self, root: Path) -> tuple[list[Path], list[dict]]:
        """Units under a given folder (unsorted) and what was skipped there."""
        found: list[Path] = []
        skipped: list[dict] = []
        try:
            if is_hf_dict(root):
                found += self.dataset_dict(root, skipped)
            elif is_hf_folder(root):
                found.append(root)
            else:
                self._walk(root, found, skipped, {root.resolve()})
        except OSError as e:
            self.bad(root, f"cannot read the folder ({e.strerror or e})", skipped)
        return found, skipped

    def _walk(self, folder: Path, found: list[Path], skipped: list[dict], above: set[Path]) -> None:
        try:
            entries = list(folder.iterdir())
        except OSError as e:  # no permission to list it, or it vanished
            self.bad(folder, f"cannot read the folder ({e.strerror or e})", skipped)
            return
        for entry in entries:
            name = entry.name
            if display_path(name) != name:
                self.bad(entry, "the name is not valid UTF-8 (rename it)", skipped)
                continue
            if name.startswith("."):
                skipped.append(_skip(entry, HIDDEN))
                continue
            try:
                if entry.is_dir():
                    real = entry.resolve()
                    if real in above:
                        skipped.append(_skip(entry, "a link to a folder that contains it"))
                    elif _is_curate_output(entry):
                        skipped.append(_skip(entry, CURATE_OUTPUT))
                    elif _is_curate_work(entry):
                        skipped.append(_skip(entry, CURATE_WORK))
                    elif is_hf_dict(entry):
                        found += self.dataset_dict(entry, skipped)
                    elif is_hf_folder(entry):
                        found.append(entry)
                    else:
                        self._walk(entry, found, skipped, above | {real})
                elif name.lower().split(".")[0] in _SKIPPED_STEMS:
                    skipped.append(_skip(entry, "a README or licence file, not data"))
                elif _suffix(entry) is None:
                    skipped.append(_skip(entry, f"unsupported file type {_type_of(name)}"))
                else:
                    found.append(entry)
            except OSError as e:
                self.bad(entry, f"cannot read ({e.strerror or e})", skipped)

    def dataset_dict(self, folder: Path, skipped: list[dict]) -> list[Path]:
        """The split folders of a DatasetDict to read; the others are listed in `skipped`."""
        self.dicts += 1
        splits = dict_splits(folder)
        want = self.split or "train"
        if want != "all" and want not in splits:
            hint = ("choose one with --split NAME, or --split all" if self.split is None else
                    "choose one of them with --split, or --split all")
            raise UnreadableFile(display_path(folder), f"this Hugging Face DatasetDict has no {want!r} split "
                                 f"(its splits: {', '.join(splits) or 'none'}); {hint}")
        out = []
        for name in splits:
            path = folder / name
            if want != "all" and name != want:
                skipped.append(_skip(path, f"split {name!r} not read (use --split {name}, or --split all)"))
            elif not is_hf_folder(path):
                self.bad(path, "split folder is not a Hugging Face save_to_disk dataset", skipped)
            else:
                out.append(path)
        return out


def _skip(path: Path, why: str) -> dict:
    return {"path": display_path(path), "reason": why, "records_read": 0}


def _type_of(name: str) -> str:
    """".csv", ".csv.gz", or "(no extension)" for a message."""
    lower = name.lower()
    gz = lower.endswith(".gz") and lower != ".gz"
    base = lower[:-3] if gz else lower
    ext = os.path.splitext(base)[1]
    return (ext + (".gz" if gz else "")) if ext else ("(no extension)" if not gz else ".gz")


def _is_curate_output(folder: Path) -> bool:
    """An output folder of curate (prism, route, drift, irft; export): its manifest names curate's version
    (an export's, its "export")."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        with open(manifest, "rb") as f:
            value = json.loads(f.read(1 << 24))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(value, dict) and ("curate_version" in value or "export" in value)


def _is_curate_work(folder: Path) -> bool:
    """A curate work (cache) folder given with --work: its marker file, or an older cache's ingest marker."""
    return (folder / ".curate-work").exists() or (folder / "ingest" / "ingest.done.json").is_file()


def is_hf_folder(path: Path) -> bool:
    """A `datasets` save_to_disk folder: a Dataset (state + arrow shards) or a DatasetDict."""
    if (path / _HF_DICT_MARKER).is_file():
        return True
    has_marker = any((path / m).is_file() for m in _HF_DATASET_MARKERS)
    return has_marker and any(path.glob("*.arrow"))


def is_hf_dict(path: Path) -> bool:
    """A `datasets` DatasetDict save_to_disk folder (dataset_dict.json beside one folder per split)."""
    return (path / _HF_DICT_MARKER).is_file()


def dict_splits(folder: Path) -> list[str]:
    """A DatasetDict's split names, in the order of its dataset_dict.json ("splits"); when that cannot be
    read, its sub-folders that are datasets, by name. A split naming a folder outside `folder` raises."""
    try:
        names = json.loads((folder / _HF_DICT_MARKER).read_text(encoding="utf-8"))["splits"]
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and is_hf_folder(p))
    for name in names:
        try:
            inside(folder, name)
        except ValueError:
            raise UnreadableFile(display_path(folder), f"dataset_dict.json names a split outside the folder: "
                                 f"{name!r}; refusing to read it") from None
    return list(dict.fromkeys(names))


def is_json_lines(path: Path) -> bool:
    """A JSON-lines file (`.jsonl`, `.jsonl.gz`): what ingest can cut into chunks of lines."""
    return path.is_file() and _suffix(path) == ".jsonl"


def _suffix(path: Path) -> str | None:
    """The base data suffix (".jsonl", ...) of a supported file name, ignoring ".gz"; else None."""
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return next((s for s in BASE_SUFFIXES if name.endswith(s)), None)
