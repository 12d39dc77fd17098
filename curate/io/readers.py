"""Raw input files -> (index, dict) records, streamed.

Two public entry points: `list_input_files` expands the paths given on the command line into readable
units (files, or Hugging Face `save_to_disk` folders), and `read_records` streams one unit's records.
A line that cannot be parsed is yielded as a `RawError` (the ingest stage quarantines it); a file that
cannot be read at all raises `UnreadableFile`, whose message names the file.

JSON text may be UTF-8 (with or without a BOM), UTF-16 or UTF-32 (told by the BOM, or by the NULs around
a leading "{" or "["); UTF-16/32 files are read through a temporary UTF-8 copy.

The index of a record is its position in the file: the physical 0-based line number for JSON lines
(blank lines consume an index but yield nothing, so indices match `sed -n` line numbers minus one), the
row number for JSON arrays, Parquet, Arrow and HF folders. Each split of a DatasetDict is its own unit
(`folder/train`), so its rows count from 0 and its records name their split in `source`.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.atomic import inside

BASE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
SUPPORTED = BASE_SUFFIXES + tuple(s + ".gz" for s in BASE_SUFFIXES)
MAX_RAW_CHARS = 64 * 1024
NESTED_TOO_DEEP = "JSON nested too deep to parse (more levels than Python's recursion limit)"
BATCH_ROWS = 1024
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
_ARROW_FILE_MAGIC = b"ARROW1"
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class UnreadableFile(Exception):
    """A whole input file cannot be read; the message starts with the file path."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"{path}: {why}")
        self.path = str(path)
        self.why = why


@dataclass(frozen=True)
class RawError:
    """A record that could not even be parsed (bad JSON, bad UTF-8, not an object)."""

    reason: str
    raw: str


# ---------------------------------------------------------------------------------------- listing


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


# ---------------------------------------------------------------------------------------- reading


def read_records(path: Path, split: str | None = None) -> Iterator[tuple[int, dict | RawError]]:
    """Stream `(index, record)` pairs of one input unit in file order (see the module docstring).

    Checks that the file can be opened before returning, so a missing or corrupt file raises here;
    a read error found later (e.g. a truncated gzip stream) raises `UnreadableFile` mid-iteration.
    A DatasetDict folder given here is read as `scan_inputs` reads it: its `train` split, or `split`
    (`"all"`: every split in name order, the index continuing across them).
    """
    path = Path(path)
    if path.is_dir():
        if is_hf_dict(path):
            found = _Scan(split, False).dataset_dict(path, [])
            return _primed(_read_hf_splits(sorted(found, key=lambda p: p.as_posix())))
        if not is_hf_folder(path):
            raise UnreadableFile(path, "folder is not a Hugging Face save_to_disk dataset")
        return _primed(_read_hf_splits([path]))
    suffix = _suffix(path)
    if suffix is None:
        raise UnreadableFile(path, f"unsupported file type (supported: {', '.join(SUPPORTED)})")
    try:
        if path.stat().st_size == 0:
            return iter(())
    except OSError as e:
        raise UnreadableFile(path, f"cannot open ({e.strerror or e})") from e
    if suffix == ".jsonl":
        records = _as_utf8(path, _read_json_lines)
    elif suffix == ".json":
        records = _as_utf8(path, _read_json)
    else:
        records = _read_columnar(path, suffix)
    return _primed(_guard(path, records))


def _primed(records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """Read the first record now, so that open errors (corrupt file, bad gzip header) raise at the call."""
    try:
        first = next(records)
    except StopIteration:
        return iter(())
    return itertools.chain([first], records)


def _guard(path: Path, records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """Turn low-level read errors raised while streaming into `UnreadableFile` naming the file."""
    try:
        yield from records
    except UnreadableFile:
        raise
    except _GZIP_ERRORS as e:
        raise UnreadableFile(path, f"not a valid gzip stream ({e})") from e
    except OSError as e:
        raise UnreadableFile(path, f"cannot read ({e.strerror or e})") from e
    except pa.ArrowException as e:
        raise UnreadableFile(path, f"read error ({e})") from e


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


# BOM-less UTF-16/32 JSON: the NULs around a leading "{" or "[" (UTF-8 JSON never has a NUL there).
_NUL_PATTERNS = tuple((fmt.format(c), enc) for c in ("{", "[") for fmt, enc in (
    ("{}\0\0\0", "utf-32-le"), ("\0\0\0{}", "utf-32-be"), ("{}\0", "utf-16-le"), ("\0{}", "utf-16-be")))
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _text_encoding(head: bytes) -> str | None:
    """UTF-16 or UTF-32 from the first bytes of a JSON file (a BOM, or NULs around "{" / "["); None for
    UTF-8 (with or without its BOM), which is read as is."""
    for bom, encoding in _BOMS:  # UTF-32 LE first: its BOM starts with UTF-16 LE's
        if head.startswith(bom):
            return encoding
    text = head.decode("latin-1")
    for pattern, encoding in _NUL_PATTERNS:
        if text.startswith(pattern):
            return encoding
    return None


def _mark_undecodable(error: UnicodeDecodeError) -> tuple[str, int]:
    """Bytes that are not UTF-16/32 become a lone surrogate, which UTF-8 cannot hold: the line that has
    them is then quarantined as not valid UTF-8, like any bad bytes, instead of failing the whole file."""
    return "\udcff", error.end


codecs.register_error("curate-mark", _mark_undecodable)


@contextmanager
def _utf8_source(path: Path) -> Iterator[Path]:
    """The JSON file `path`, or when it is UTF-16/32 a temporary UTF-8 copy of it (BOM dropped)."""
    with _open_binary(path) as f:
        encoding = _text_encoding(f.read(4))
    if encoding is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="curate-utf8-") as tmp:
        local = Path(tmp) / "utf8.json"
        decoder = codecs.getincrementaldecoder(encoding)(errors="curate-mark")
        with _open_binary(path) as src, open(local, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(decoder.decode(block).encode("utf-8", "surrogatepass"))
            dst.write(decoder.decode(b"", final=True).encode("utf-8", "surrogatepass"))
        yield local


def _as_utf8(path: Path, read: Callable[[Path, Path], Iterator]) -> Iterator:
    with _utf8_source(path) as local:
        yield from read(path, local)


def _read_json_lines(path: Path, local: Path | None = None) -> Iterator[tuple[int, dict | RawError]]:
    """One JSON object per physical line, read line by line (files may be larger than memory).
    `local`: where the bytes are, when not at `path` (a UTF-8 copy)."""
    with _open_binary(local or path) as f:
        for index, line in enumerate(f):
            record = parse_json_line(line, first=index == 0)
            if record is not None:
                yield index, record


def read_json_line_chunks(
    path: Path, chunk_bytes: int, continues: Callable[[bytes, bool], bool]
) -> Iterator[tuple[int, bytes]]:
    """A JSON-lines file as (index of the first line, whole lines) chunks of about `chunk_bytes`, for
    ingest to parse in parallel. A chunk never ends on a line for which `continues(line, first)` holds
    (a blank line, or a WebShop page visit whose session may go on), so nothing that must be read
    together is split. Errors are raised as `read_records` raises them, after the lines before them."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return iter(())
    except OSError as e:
        raise UnreadableFile(path, f"cannot open ({e.strerror or e})") from e
    return _primed(_guard(path, _as_utf8(path, lambda _, local: _line_chunks(local, chunk_bytes, continues))))


def _line_chunks(path: Path, chunk_bytes: int, continues: Callable[[bytes, bool], bool]):
    start, offset = 0, 0  # line index and byte offset (uncompressed) where the next chunk begins
    with _open_binary(path) as f:
        while True:
            try:
                data = f.read(chunk_bytes) + f.readline()  # read in C; then up to the end of a line
                while data and continues(*_last_line(data, start)):
                    line = f.readline()
                    if not line:
                        break
                    data += line
            except Exception:
                yield from _salvage(path, start, offset)  # the whole lines before the break, as before
                raise
            if not data:
                return
            yield start, data
            start, offset = start + data.count(b"\n"), offset + len(data)


def _last_line(data: bytes, start: int) -> tuple[bytes, bool]:
    """The last non-blank line of a chunk (with the blank ones after it) and whether it is the file's first."""
    begin = data.rstrip(b"\n").rfind(b"\n") + 1
    return data[begin:], start == 0 and begin == 0


def _salvage(path: Path, start: int, offset: int) -> Iterator[tuple[int, bytes]]:
    """After a read error in a block: reread it line by line and yield what precedes the error."""
    lines = []
    with _open_binary(path) as f:
        try:
            f.seek(offset)
            for line in f:
                lines.append(line)
        except Exception:
            pass
    if lines:
        yield start, b"".join(lines)


def parse_json_line(line: bytes, first: bool = False) -> dict | RawError | None:
    """Parse one JSONL line; None for a blank line. Never raises."""
    if first and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM written by some Windows tools
        line = line[3:]
    line = line.rstrip(b"\r\n")  # so error columns point into the line, not past its end
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawError(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at offset {e.start})", _raw_text(line))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawError(f"malformed JSON: {e.msg} (col {e.colno})", _raw_text(text))
    except RecursionError:
        return RawError(NESTED_TOO_DEEP, _raw_text(text))
    return _as_record(value, text)


def _as_record(value: Any, text: str) -> dict | RawError:
    if isinstance(value, dict):
        return value
    return RawError(f"record is not a JSON object (got {type(value).__name__})", _raw_text(text))


def _raw_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text.rstrip("\r\n")[:MAX_RAW_CHARS]


def _read_json(path: Path, local: Path | None = None) -> Iterator[tuple[int, dict | RawError]]:
    """A `.json` file: a JSON array, a single object, or (despite the name) JSON lines.

    Decides from the start of the file so that a large JSON-lines file is still streamed: if its first
    line is a complete object and more follows, it is JSON lines. Otherwise the whole file is parsed
    (arrays cannot be streamed without a parser library); if that fails and the file starts with "{",
    it is taken as JSON lines with a bad line, so the good lines survive and the bad ones are reported.
    A document nested deeper than the parser can go is such a bad line when it is an object, else the
    file is unreadable.
    """
    local = local or path
    with _open_binary(local) as f:
        first_line = f.readline()
        more = f.read(1)
        while more.isspace():
            more = f.read(1)
    if isinstance(parse_json_line(first_line, first=True), dict) and more:
        yield from _read_json_lines(path, local)
        return
    with _open_binary(local) as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UnreadableFile(path, f"not valid UTF-8 (byte offset {e.start})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        if data.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            yield from _read_json_lines(path, local)
            return
        if isinstance(e, RecursionError):
            raise UnreadableFile(path, NESTED_TOO_DEEP) from None
        raise UnreadableFile(path, f"malformed JSON: {e.msg} (line {e.lineno} col {e.colno})") from e
    for index, item in enumerate(value if isinstance(value, list) else [value]):
        yield index, _as_record(item, json.dumps(item, ensure_ascii=False, default=str)[:MAX_RAW_CHARS])


# ------------------------------------------------------------------------------- Parquet and Arrow


def _read_columnar(path: Path, suffix: str) -> Iterator[tuple[int, dict]]:
    with _seekable(path) as local:
        if suffix == ".parquet":
            batches = _parquet_batches(path, local)
        else:
            batches = _arrow_batches(path, local)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield index, row
                index += 1


@contextmanager
def _seekable(path: Path) -> Iterator[Path]:
    """Parquet and the Arrow file format need random access: decompress `.gz` to a temporary file."""
    if not path.name.lower().endswith(".gz"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="curate-gunzip-") as tmp:
        local = Path(tmp) / path.name[:-3]
        with gzip.open(path, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


def _parquet_batches(path: Path, local: Path) -> Iterator[pa.RecordBatch]:
    try:
        parquet = pq.ParquetFile(local)
    except (pa.ArrowException, OSError) as e:
        raise UnreadableFile(path, f"not a Parquet file ({e})") from e
    yield from parquet.iter_batches(batch_size=BATCH_ROWS)


def _arrow_batches(path: Path, local: Path) -> Iterator[pa.RecordBatch]:
    """Arrow IPC, either format: the file format starts with the magic "ARROW1", a stream does not."""
    with open(local, "rb") as f:
        is_file_format = f.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
    try:
        if is_file_format:
            reader = pa.ipc.open_file(pa.memory_map(str(local)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(local))))
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise UnreadableFile(path, f"not an Arrow IPC file or stream ({e})") from e


def _read_hf_splits(splits: list[Path]) -> Iterator[tuple[int, dict]]:
    """save_to_disk Dataset folders (one, or the splits of a DatasetDict), the index continuing."""
    index = 0
    for split in splits:
        for shard in _hf_shards(split):
            for _, row in _guard(shard, _read_columnar(shard, ".arrow")):  # errors name the shard
                yield index, row
                index += 1


def _hf_shards(split: Path) -> list[Path]:
    """Arrow shards in the order `state.json` lists them (falls back to name order). A shard outside the
    folder (a "../" name, an absolute path, a link out) raises `UnreadableFile` naming the folder."""
    try:
        state = json.loads((split / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        names = sorted(p.name for p in split.glob("*.arrow"))
    out = []
    for name in names:
        try:
            out.append(inside(split, name))
        except ValueError:
            raise UnreadableFile(split, f"state.json names a data file outside the folder: {name!r}; "
                                 "refusing to read it") from None
    return out
