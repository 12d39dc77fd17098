"""`curate export`: a routed folder (sft/, rl/, optional pairs/) -> the files one trainer reads.

    export("routed/", "trl", "exports/trl")   # or "verl", "openrlhf", "llamafactory"

One file per partition (`sft.<ext>`, `rl.<ext>`, `pairs.<ext>`), streamed shard by shard after one
scan of the partition's shards (its schema: which message fields any row uses), plus a manifest.json
(files, rows, columns, sha256). Everything is built in a staging folder next to OUT and swapped in,
so OUT is always a complete export; the same routed folder gives the same bytes.

One row never stops an export: a row the target cannot represent is skipped and counted by reason in
the manifest's `rows_skipped` (with the first records of each reason named), and for every partition
`rows_in` = `counts` (rows written) + its skipped rows (see docs/exports.md)."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import pyarrow as pa

import curate
from curate.formats.export import common, llamafactory, openrlhf, trl, verl
from curate.io import folders
from curate.io.atomic import file_sha256, read_json, write_json

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
    _check_listed(routed, parts)
    return parts


def _check_listed(routed: Path, parts: dict[str, list[Path]]) -> None:
    """The shards are exactly those the manifest lists, with the sha256 it gives (manifests of older
    versions have no digests: not checked). ValueError naming the first file that differs."""
    manifest = read_json(routed / "manifest.json")
    digests, listed = manifest.get("sha256"), manifest.get("files", {})
    if not isinstance(digests, dict):
        return
    for part, files in parts.items():
        names = [f.relative_to(routed).as_posix() for f in files]
        if sorted(names) != sorted(listed.get(part, [])):
            extra = sorted(set(names) ^ set(listed.get(part, [])))
            raise ValueError(f"{routed}/{part}: its files differ from those {routed}/manifest.json lists "
                             f"({', '.join(extra[:3])}); it was changed outside curate")
        for name, path in zip(names, files):
            if file_sha256(path) != digests.get(name):
                raise ValueError(f"{path}: its sha256 is not the one {routed}/manifest.json gives; the routed "
                                 "folder was changed by another run or by hand. Rerun the export after it")


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
    check_output(routed, out)
    with folders.job_folders(out.resolve(), None, [routed], export=True):
        return _export(target, to, routed, out.resolve())


def _export(target: ModuleType, to: str, routed: Path, out: Path) -> dict:
    routed_sha = file_sha256(routed / "manifest.json") if (routed / "manifest.json").is_file() else None
    parts = input_partitions(routed)
    staging = folders.new_staging(out)
    try:
        files, skipped, scans, logs = _write_partitions(target, parts, staging)
        for part in common.PARTITIONS:  # an empty routed partition (a folder with no shard) has no file
            if (routed / part).is_dir() and part not in parts:
                skipped[part] = "the routed partition has no rows: no file written"
        extra = target.finish(staging, {p: f["file"] for p, f in files.items()}, scans, logs) \
            if hasattr(target, "finish") else []
        manifest = {
            "export": {"target": to, "routed": str(routed), "curate_version": curate.__version__,
                       "routed_manifest_sha256": routed_sha},
            "files": {f["file"]: {k: v for k, v in f.items() if k != "file"} for f in files.values()},
            "counts": {p: f["rows"] for p, f in files.items()},
            "rows_in": {p: log.rows_in for p, log in logs.items()},
            "rows_skipped": rows_skipped(logs),
            "rows_folded": rows_folded(logs),
            "other_files": {name: file_sha256(staging / name) for name in extra},
            "skipped": skipped,
            "conventions": {"ground_truth": "string on every row; \"\" when the input had none",
                            "sft_messages": "trailing turns after the last assistant turn are dropped"},
        }
        if file_sha256(routed / "manifest.json") != routed_sha:
            raise ValueError(f"{routed} was rewritten by another run while it was exported; rerun the export")
        write_json(staging / "manifest.json", manifest)
        folders.commit(out, carry=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def rows_skipped(logs: dict[str, common.RowLog]) -> dict:
    """{"total": rows skipped, "by_partition": {partition: {reason: rows}}, "examples": {partition:
    [{"reason", "shard", "id", "source", "source_index"}, ...]}}: every exported partition is listed,
    `{}` / `[]` when none of its rows was skipped."""
    return {"total": sum(sum(log.skipped.values()) for log in logs.values()),
            "by_partition": {p: dict(sorted(log.skipped.items())) for p, log in logs.items()},
            "examples": {p: log.examples for p, log in logs.items()}}


def rows_folded(logs: dict[str, common.RowLog]) -> dict:
    """{"total": rows written after at least one fold, "by_partition": {partition: {rule: rows}}}."""
    return {"total": sum(log.folded_rows for log in logs.values()),
            "by_partition": {p: dict(sorted(log.folded.items())) for p, log in logs.items()}}


def _write_partitions(target: ModuleType, parts: dict[str, list[Path]], staging: Path
                      ) -> tuple[dict, dict, dict[str, common.Partition], dict[str, common.RowLog]]:
    """Each partition: scanned (every shard once), then converted shard by shard into one file."""
    sinks, skipped, scans, logs = {}, {}, {}, {}
    with ExitStack() as stack:  # every file is renamed into staging/ when the stack closes
        for part, shards in parts.items():
            if part not in target.PARTITIONS:
                skipped[part] = target.UNSUPPORTED[part]
                continue
            scan = scans[part] = common.scan_partition(part, shards)
            sink = sinks[part] = common.FileSink(staging / f"{part}.{target.EXT}", target.KIND, stack)
            log = logs[part] = common.RowLog(part)
            for path, table in common.read_shards(scan):
                log.rows_in += table.num_rows
                table = common.screen(table, path, scan, log)     # rows no target can write
                converted = target.convert(part, table, path, sink.rows, scan, log)
                if isinstance(converted, pa.Table):
                    sink.write_table(converted)
                else:
                    sink.write_rows(converted)
    for part, log in logs.items():
        if log.rows_in != sinks[part].rows + sum(log.skipped.values()):
            raise RuntimeError(f"{part}: {log.rows_in} rows in, {sinks[part].rows} written and "
                               f"{sum(log.skipped.values())} skipped: a row went missing (a bug in curate)")
    files = {p: {"file": s.path.name, "partition": p, "rows": s.rows, "columns": s.columns,
                 "sha256": file_sha256(s.path)} for p, s in sinks.items() if s.path.exists()}
    return files, skipped, scans, logs
