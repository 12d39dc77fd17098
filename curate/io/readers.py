"""Raw input files -> (index, dict) records, streamed.

Two public entry points: `list_input_files` expands the paths given on the command line into readable
units (files, or Hugging Face `save_to_disk` folders), and `read_records` streams one unit's records.
A line that cannot be parsed is yielded as a `RawError` (the ingest stage quarantines it); a file that
cannot be read at all raises `UnreadableFile`, whose message names the file.

The index of a record is its position in the file: the physical 0-based line number for JSON lines
(blank lines consume an index but yield nothing, so indices match `sed -n` line numbers minus one), the
row number for JSON arrays, Parquet, Arrow and HF folders (a DatasetDict's splits continue the count).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

BASE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
SUPPORTED = BASE_SUFFIXES + tuple(s + ".gz" for s in BASE_SUFFIXES)
MAX_RAW_CHARS = 64 * 1024
BATCH_ROWS = 1024
# Docs that sit next to data in dataset folders, by lowercase stem: README.json is not a dataset.
# (SOURCE.md, which our data folders carry, is skipped anyway: .md is not a data type.)
_SKIPPED_STEMS = ("readme", "license", "licence")
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


def list_input_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into input units, deterministically ordered.

    Within each given folder units are sorted by relative path; the given paths keep their order, and a
    unit reached twice is listed once. An HF `save_to_disk` folder is one unit. An explicitly given file
    with an unsupported type, a missing path, or a folder with no input in it raises `UnreadableFile`:
    silently ignoring something the user named would hide a typo.
    """
    units: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise UnreadableFile(path, "no such file or folder")
        if path.is_dir():
            found = [path] if is_hf_folder(path) else sorted(_walk(path), key=lambda p: p.as_posix())
            if not found:
                raise UnreadableFile(path, f"folder has no input files (supported: {', '.join(SUPPORTED)})")
        elif _suffix(path) is None:
            raise UnreadableFile(path, f"unsupported file type (supported: {', '.join(SUPPORTED)})")
        else:
            found = [path]
        for unit in found:
            key = unit.resolve()
            if key not in seen:
                seen.add(key)
                units.append(unit)
    return units


def is_hf_folder(path: Path) -> bool:
    """A `datasets` save_to_disk folder: a Dataset (state + arrow shards) or a DatasetDict."""
    if (path / _HF_DICT_MARKER).is_file():
        return True
    has_marker = any((path / m).is_file() for m in _HF_DATASET_MARKERS)
    return has_marker and any(path.glob("*.arrow"))


def _walk(folder: Path) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name.lower().split(".")[0] in _SKIPPED_STEMS:
            continue
        if entry.is_dir():
            if is_hf_folder(entry):
                yield entry
            else:
                yield from _walk(entry)
        elif _suffix(entry) is not None:
            yield entry


def is_json_lines(path: Path) -> bool:
    """A JSON-lines file (`.jsonl`, `.jsonl.gz`): what ingest can cut into chunks of lines."""
    return path.is_file() and _suffix(path) == ".jsonl"


def _suffix(path: Path) -> str | None:
    """The base data suffix (".jsonl", ...) of a supported file name, ignoring ".gz"; else None."""
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return next((s for s in BASE_SUFFIXES if name.endswith(s)), None)


# ---------------------------------------------------------------------------------------- reading


def read_records(path: Path) -> Iterator[tuple[int, dict | RawError]]:
    """Stream `(index, record)` pairs of one input unit in file order (see the module docstring).

    Checks that the file can be opened before returning, so a missing or corrupt file raises here;
    a read error found later (e.g. a truncated gzip stream) raises `UnreadableFile` mid-iteration.
    """
    path = Path(path)
    if path.is_dir():
        if not is_hf_folder(path):
            raise UnreadableFile(path, "folder is not a Hugging Face save_to_disk dataset")
        return _primed(_read_hf_folder(path))
    suffix = _suffix(path)
    if suffix is None:
        raise UnreadableFile(path, f"unsupported file type (supported: {', '.join(SUPPORTED)})")
    try:
        if path.stat().st_size == 0:
            return iter(())
    except OSError as e:
        raise UnreadableFile(path, f"cannot open ({e.strerror or e})") from e
    if suffix == ".jsonl":
        records = _read_json_lines(path)
    elif suffix == ".json":
        records = _read_json(path)
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


def _read_json_lines(path: Path) -> Iterator[tuple[int, dict | RawError]]:
    """One JSON object per physical line, read line by line (files may be larger than memory)."""
    with _open_binary(path) as f:
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
    return _primed(_guard(path, _line_chunks(path, chunk_bytes, continues)))


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
    return _as_record(value, text)


def _as_record(value: Any, text: str) -> dict | RawError:
    if isinstance(value, dict):
        return value
    return RawError(f"record is not a JSON object (got {type(value).__name__})", _raw_text(text))


def _raw_text(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text.rstrip("\r\n")[:MAX_RAW_CHARS]


def _read_json(path: Path) -> Iterator[tuple[int, dict | RawError]]:
    """A `.json` file: a JSON array, a single object, or (despite the name) JSON lines.

    Decides from the start of the file so that a large JSON-lines file is still streamed: if its first
    line is a complete object and more follows, it is JSON lines. Otherwise the whole file is parsed
    (arrays cannot be streamed without a parser library); if that fails and the file starts with "{",
    it is taken as JSON lines with a bad line, so the good lines survive and the bad ones are reported.
    """
    with _open_binary(path) as f:
        first_line = f.readline()
        more = f.read(1)
        while more.isspace():
            more = f.read(1)
    if isinstance(parse_json_line(first_line, first=True), dict) and more:
        yield from _read_json_lines(path)
        return
    with _open_binary(path) as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UnreadableFile(path, f"not valid UTF-8 (byte offset {e.start})") from e
    except json.JSONDecodeError as e:
        if data.lstrip().startswith(b"{"):
            yield from _read_json_lines(path)
            return
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


def _read_hf_folder(folder: Path) -> Iterator[tuple[int, dict]]:
    """A save_to_disk Dataset, or a DatasetDict whose splits are read in sorted name order."""
    if (folder / _HF_DICT_MARKER).is_file():
        splits = sorted(p for p in folder.iterdir() if p.is_dir() and is_hf_folder(p))
    else:
        splits = [folder]
    index = 0
    for split in splits:
        for shard in _hf_shards(split):
            for _, row in _guard(shard, _read_columnar(shard, ".arrow")):  # errors name the shard
                yield index, row
                index += 1


def _hf_shards(split: Path) -> list[Path]:
    """Arrow shards in the order `state.json` lists them (falls back to name order)."""
    try:
        state = json.loads((split / "state.json").read_text(encoding="utf-8"))
        return [split / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(split.glob("*.arrow"))
