"""Atomic, deterministic file writes: write a temporary sibling, fsync, rename. A reader (or a rerun
after SIGKILL) sees either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return table.select(columns) if columns else table


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    with jsonl_writer(path) as sink:
        for row in rows:
            sink.write(row)
    return sink.count


class JsonlSink:
    """Appends rows as canonical JSON lines to an open file and counts them (see `jsonl_writer`)."""

    def __init__(self, fh):
        self._fh, self.count = fh, 0

    def write(self, row: dict) -> None:
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
    """Every data file a pipeline state file names (stage results' "path"; ingest's "shards" and
    "quarantine") lies inside `root`, the work folder; input files (ingest "files") are not checked.
    Relative paths are taken as the readers take them: from the current directory."""
    for key, value in state.items():
        entries = value.get("shards", []) if isinstance(value, dict) else value
        if isinstance(value, dict) and isinstance(value.get("quarantine"), str):
            inside(root, Path(value["quarantine"]).absolute())
        if key != "config" and isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and "path" in entry:
                    inside(root, Path(entry["path"]).absolute())


def clean_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temporary files a killed run left behind."""
    n = 0
    for p in Path(folder).rglob(f"*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n
