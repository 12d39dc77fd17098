"""`curate export`: a routed folder (sft/, rl/, optional pairs/) -> the files one trainer reads.

    export("routed/", "trl", "exports/trl")   # or "verl", "openrlhf", "llamafactory"

One file per partition (`sft.<ext>`, `rl.<ext>`, `pairs.<ext>`), streamed shard by shard after one
scan of the partition's shards (its schema: which message fields any row uses), plus a manifest.json
(files, rows, columns, sha256). Everything is built in a staging folder next to OUT and swapped in,
so OUT is always a complete export; the same routed folder gives the same bytes."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import pyarrow as pa

import curate
from curate.formats.export import common, llamafactory, openrlhf, trl, verl
from curate.io.atomic import file_sha256, read_json, write_json
from curate.io.routed import swap_into_place

TARGETS: dict[str, ModuleType] = {"trl": trl, "verl": verl, "openrlhf": openrlhf, "llamafactory": llamafactory}


def input_partitions(routed: Path) -> dict[str, list[Path]]:
    """Shard files of each partition present; a folder that is not a finished routed output is an error."""
    if not routed.is_dir():
        raise FileNotFoundError(f"routed folder not found: {routed}")
    if not (routed / "manifest.json").is_file():
        raise FileNotFoundError(f"{routed / 'manifest.json'} not found: not a finished curate output "
                                "(prism, drift or irft write it last)")
    parts = {p: common.shard_files(routed, p) for p in common.PARTITIONS}
    parts = {p: files for p, files in parts.items() if files}
    if not parts:
        raise ValueError(f"{routed}: no *.arrow shards in {', '.join(p + '/' for p in common.PARTITIONS)}")
    return parts


def check_output(routed: Path, out: Path) -> None:
    """Refuse an OUT whose swap would delete the input or a folder that is not an earlier export."""
    r, o = routed.resolve(), out.resolve()
    if o == r or o in r.parents or any(o == r / p or r / p in o.parents for p in common.PARTITIONS):
        raise ValueError(f"--out {out} would overwrite the routed folder {routed}; choose another folder")
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        if not (manifest.is_file() and "export" in read_json(manifest)):
            raise ValueError(f"{out} exists and is not a curate export; refusing to replace it")


def export(routed_dir: str | Path, to: str, out: str | Path) -> dict:
    """Write the export for trainer `to`; returns its manifest."""
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; choose from {', '.join(TARGETS)}")
    target, routed, out = TARGETS[to], Path(routed_dir), Path(out)
    parts = input_partitions(routed)
    check_output(routed, out)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        files, skipped, scans = _write_partitions(target, parts, staging)
        extra = target.finish(staging, {p: f["file"] for p, f in files.items()}, scans) \
            if hasattr(target, "finish") else []
        manifest = {
            "export": {"target": to, "routed": str(routed), "curate_version": curate.__version__,
                       "routed_manifest_sha256": file_sha256(routed / "manifest.json")},
            "files": {f["file"]: {k: v for k, v in f.items() if k != "file"} for f in files.values()},
            "counts": {p: f["rows"] for p, f in files.items()},
            "other_files": {name: file_sha256(staging / name) for name in extra},
            "skipped": skipped,
            "conventions": {"ground_truth": "string on every row; \"\" when the input had none",
                            "sft_messages": "trailing turns after the last assistant turn are dropped"},
        }
        write_json(staging / "manifest.json", manifest)
        swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_partitions(target: ModuleType, parts: dict[str, list[Path]],
                      staging: Path) -> tuple[dict, dict, dict[str, common.Partition]]:
    """Each partition: scanned (every shard once), then converted shard by shard into one file."""
    sinks, skipped, scans = {}, {}, {}
    with ExitStack() as stack:  # every file is renamed into staging/ when the stack closes
        for part, shards in parts.items():
            if part not in target.PARTITIONS:
                skipped[part] = target.UNSUPPORTED[part]
                continue
            scan = scans[part] = common.scan_partition(part, shards)
            sink = sinks[part] = common.FileSink(staging / f"{part}.{target.EXT}", target.KIND, stack)
            for path, table in common.read_shards(scan):
                converted = target.convert(part, table, path, sink.rows, scan)
                if isinstance(converted, pa.Table):
                    sink.write_table(converted)
                else:
                    sink.write_rows(converted)
    files = {p: {"file": s.path.name, "partition": p, "rows": s.rows, "columns": s.columns,
                 "sha256": file_sha256(s.path)} for p, s in sinks.items() if s.path.exists()}
    return files, skipped, scans
