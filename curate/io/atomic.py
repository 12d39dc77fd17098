"""Atomic, deterministic file writes: write a temporary sibling, fsync, rename. A reader (or a rerun
after SIGKILL) sees either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

TMP_SUFFIX = ".tmp"
# The temporary name atomic_path gives: ".NAME.PID.tmp". Only files of this shape are curate's to delete.
OWN_TEMP = re.compile(r"^\..+\.\d+\.tmp$")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds.

    An OSError while writing (a full disk, a quota: pyarrow's message names no file) is raised again
    as an OSError that names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is not None and not isinstance(e.filename, int):
            raise
        code = e.errno or _errno_in(str(e))
        raise OSError(code, f"cannot write ({os.strerror(code) if code else e})", str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def _errno_in(message: str) -> int | None:
    """pyarrow's OSError carries the errno only in its text ("... [errno 28] No space left ...")."""
    found = re.search(r"errno (\d+)", message)
    return int(found.group(1)) if found else None


def write_arrow(path: str | os.PathLike, table: pa.Table, digest: bool = True) -> str | None:
    """Arrow IPC *stream* (what `datasets.load_dataset("arrow")` reads); returns the file's sha256
    (hashed in memory, not read back), or None without `digest` (outputs nothing downstream keys on)."""
    with atomic_path(path) as tmp:
        if not digest:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return None
        buffer = pa.BufferOutputStream()
        with pa.ipc.new_stream(buffer, table.schema) as writer:
            writer.write_table(table)
        data = buffer.getvalue()
        with pa.OSFile(str(tmp), "wb") as sink:
            sink.write(data)
    return hashlib.sha256(data).hexdigest()


def read_arrow(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """An Arrow IPC stream file, memory-mapped; only `columns` when given (KeyError for one it lacks)."""
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return table.select(columns) if columns else table


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` atomically as indented JSON (keys sorted, non-ASCII kept, a final newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike):
    """A JSON file's value (ValueError when it is not JSON)."""
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write `rows` atomically as JSON lines, one canonical object (keys sorted) per line; the row count."""
    with jsonl_writer(path) as sink:
        for row in rows:
            sink.write(row)
    return sink.count


class JsonlSink:
    """Appends rows as canonical JSON lines to an open file and counts them (see `jsonl_writer`)."""

    def __init__(self, fh):
        self._fh, self.count = fh, 0

    def write(self, row: dict) -> None:
        """Append one row as a line of JSON (keys sorted, non-ASCII kept)."""
        self._fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        self.count += 1

    def copy_lines(self, path: str | os.PathLike) -> None:
        """Append another JSON-lines file row by row (streamed: quarantine files can be large)."""
        with open(path, encoding="utf-8") as src:
            for line in src:
                if line.strip():
                    self._fh.write(line if line.endswith("\n") else line + "\n")
                    self.count += 1


@contextmanager
def jsonl_writer(path: str | os.PathLike) -> Iterator[JsonlSink]:
    """A JSON-lines file written row by row, never held in memory, committed atomically at the end.

    An unpaired surrogate (from a "\\ud800" escape in bad input) is written as that same escape: it only
    occurs inside JSON strings, so the line stays valid JSON and reads back to the same string."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", errors="backslashreplace") as fh:
        yield JsonlSink(fh)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(obj) -> str:
    """sha256 of an object's canonical JSON: cache keys from configs, identities and input hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` (relative to `root`, or absolute) resolved, if it lies inside `root`; else ValueError.

    Manifests and state files name data files; a crafted "../", absolute path or symlink in one must not
    lead a reader or a writer out of the folder it describes."""
    base = Path(root).resolve()
    full = (base / path).resolve()  # an absolute `path` replaces `base` here
    if full != base and base not in full.parents:
        raise ValueError(f"{path}: outside {base}; refusing a path that escapes its folder")
    return full


def check_state_paths(root: str | os.PathLike, state: dict) -> None:
    """Every data file a pipeline state file names (any "path" or "quarantine" string in it, at any depth:
    stage results, ingest's shards, the signal stages' shards) lies inside `root`, the work folder. The
    inputs (ingest's "files", "skipped", "not_read") and the config are not data files: not checked.
    Relative paths are taken as the readers take them: from the current directory. ValueError naming it."""
    def visit(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("path", "quarantine") and isinstance(value, str):
                    inside(root, Path(value).absolute())
                elif key not in ("files", "config", "skipped", "not_read"):
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit({k: v for k, v in state.items() if k != "config"})


def clean_stale_temps(folder: str | os.PathLike) -> int:
    """Remove the temporary files (atomic_path's ".NAME.PID.tmp") a killed run left in a folder curate
    owns; call it under the folder's lock. Any other file, a user's "notes.tmp" included, stays."""
    n = 0
    for p in Path(folder).rglob(f"*{TMP_SUFFIX}"):
        if OWN_TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
