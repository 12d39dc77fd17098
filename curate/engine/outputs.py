"""A job's output folder: built in a staging folder beside OUT and switched in as a whole.

Every job writes the same way: partition shards (`PART/part-NNNNN.arrow`, shard i of the work cache ->
part i, so the same input gives the same files byte for byte), one quarantine file (ingest's rows first,
then the job's own), and the manifest, last, from one builder: the job's counts must reconcile (its
`balance` counts sum to the input's) and the manifest must satisfy the job's schema in schemas/, or nothing
is switched in. Then `io.folders.commit` replaces OUT and the report is (re)written."""

from __future__ import annotations

import platform
import threading
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pyarrow as pa

import curate
from curate.io import folders
from curate.io.atomic import jsonl_writer, write_arrow, write_json
from curate.io.quarantine import reconcile
from curate.schema import load_json_schema

QUARANTINE = "quarantine/part-00000.jsonl"


class JobOutput:
    """The output of one job run, open as a context (its quarantine file is committed when it closes).

    `job`: the Job class (its name, partitions, balance); `ingest_quarantine`: the ingest stage's
    quarantine file, copied first. Call under the output lock, after `io.folders.recover`."""

    def __init__(self, job, out: Path, ingest_quarantine: str | Path):
        self.job, self.out = job, out
        self.staging = folders.new_staging(out)
        self.files: dict[str, list[str]] = {p: [] for p in job.partitions}
        self.sha256: dict[str, str] = {}
        self._ingest_quarantine = ingest_quarantine
        self._lock = threading.Lock()

    def __enter__(self) -> JobOutput:
        self._writer = jsonl_writer(self.staging / QUARANTINE)
        self.quarantine = self._writer.__enter__()   # .write(row), .count
        self.quarantine.copy_lines(self._ingest_quarantine)
        return self

    def __exit__(self, *exc) -> None:
        self._writer.__exit__(*exc)
        for part in self.job.partitions:  # an empty partition is an empty folder: readers find it, with no rows
            (self.staging / part).mkdir(exist_ok=True)

    def write_part(self, partition: str, i: int, table: pa.Table) -> str:
        """Shard i of `partition`; returns its name (PART/part-NNNNN.arrow), listed in the manifest."""
        return self.write_file(f"{partition}/part-{i:05d}.arrow", table, partition)

    def write_file(self, name: str, table: pa.Table, listed_as: str | None = None) -> str:
        """Any Arrow file of the output (NAME relative to OUT), its sha256 in the manifest; `listed_as`:
        its files entry (default: its folder). Safe from several threads: the manifest lists each entry's
        files in shard order, whatever order they were written in."""
        digest = write_arrow(self.staging / name, table)
        with self._lock:
            self.sha256[name] = digest
            self.files.setdefault(listed_as or name.split("/")[0], []).append(name)
        return name

    def finish(self, counts: dict, model, provenance: dict, **fields) -> dict:
        """Build the manifest (curate_version, job, counts, the job's `fields`, files, sha256, model, then
        `provenance`), check it, write it and switch the output in; the report follows (a failure there
        only warns). RuntimeError when the counts do not reconcile; jsonschema.ValidationError when the
        manifest breaks the job's schema (a bug: nothing is switched in)."""
        from curate.report import try_write_report

        files = {entry: sorted(names, key=_shard_order) for entry, names in self.files.items()}
        manifest = {"curate_version": curate.__version__, "job": self.job.name, "counts": counts, **fields,
                    "files": files, "sha256": self.sha256, "model": model, **provenance}
        reconcile(counts, *self.job.balance)
        validate(manifest, f"{self.job.name}_manifest")
        write_json(self.staging / "manifest.json", manifest)
        folders.commit(self.out)
        try_write_report(self.out)
        return manifest


def _shard_order(name: str) -> tuple[int, str]:
    """PART/part-NNNNN.arrow by its shard number (more than 99999 shards have wider numbers)."""
    stem = name.rsplit("/", 1)[-1]
    return (int(stem[5:].split(".")[0]), name) if stem.startswith("part-") else (-1, name)


def validate(document: dict, schema_name: str) -> None:
    """jsonschema validation of `document` against schemas/<schema_name>.schema.json."""
    import jsonschema

    jsonschema.validate(document, load_json_schema(schema_name))


def provenance(config, ingest: dict, cache: dict, timings: dict) -> dict:
    """The manifest fields every job shares: what ran (the job's options), on what (input files, skipped
    files, ingest notes), what came from the cache, how long each step took (s) and with which libraries."""
    return {"config": asdict(config) if is_dataclass(config) else config, "inputs": ingest["files"],
            "skipped_files": ingest.get("skipped", []), "ingest_notes": ingest.get("notes", {}),
            "cache": cache, "timings_s": {k: round(v, 3) for k, v in timings.items()}, "versions": versions()}


def versions() -> dict:
    """Versions of the libraries whose behaviour the outputs depend on (None: not installed), read from
    the installed distributions' metadata so that none is imported for it."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pa.__version__, "datasets": installed("datasets"), "polars": installed("polars")}
