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
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.atomic import inside
from curate.io.jsonline import MAX_RAW_CHARS, NESTED_TOO_DEEP, _as_record, parse_json_line
from curate.io.listing import (BASE_SUFFIXES, CURATE_OUTPUT, CURATE_WORK, HIDDEN, SUPPORTED, Listing, _Scan, _suffix,
                               dict_splits, display_path, is_hf_dict, is_hf_folder, is_json_lines, list_input_files,
                               scan_inputs)
from curate.io.read_errors import RawError, UnreadableFile

# Listing (curate.io.listing), line parsing (curate.io.jsonline) and the error types (curate.io.read_errors)
# live in their own modules; their public names are re-exported here, where callers import them.
__all__ = ["BASE_SUFFIXES", "BATCH_ROWS", "CURATE_OUTPUT", "CURATE_WORK", "HIDDEN", "MAX_RAW_CHARS", "NESTED_TOO_DEEP",
           "SUPPORTED", "Listing", "RawError", "UnreadableFile", "dict_splits", "display_path", "is_hf_dict",
           "is_hf_folder", "is_json_lines", "list_input_files", "parse_json_line", "read_json_line_chunks",
           "read_records", "scan_inputs"]

BATCH_ROWS = 1024
_ARROW_FILE_MAGIC = b"ARROW1"
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


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
