"""The Python API: every job from a notebook, on files or on data already in memory.

    import curate
    routed = curate.prism(rows, out="routed", model="path/to/model")   # rows: a list of dicts
    routed["rl"]                 # a datasets.Dataset, memory-mapped from routed/rl/*.arrow
    routed.manifest["counts"]

Each job function takes what the command line takes (options by their flag names, `max_length=512`) and
runs the same job: the same files, cache, locks and determinism; a rerun with the same data and options
computes nothing. Data may be paths (str or Path, or a list of them), a `datasets.Dataset`, a
`datasets.DatasetDict` (with `split=`), a list of dicts, or a polars or pandas DataFrame. Data in memory is
written once, as `<source>.jsonl` (list of dicts) or `<source>.parquet` (the others), into a folder
beside OUT (`.OUT.inputs/`): the rows' `source` column names that file, and a rerun with unchanged rows
rewrites nothing and reuses the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from curate.io.atomic import atomic_path, read_json

PARTITIONS = {"prism": ("sft", "rl"), "drift": ("sft",), "irft": ("pairs", "stage_index")}


def _datasets():
    import datasets

    return datasets


class Result(DatasetDict):
    """A job's output as a `datasets.DatasetDict` by partition, each Dataset memory-mapped from the shards
    the job wrote, with `manifest` (the run's manifest.json as a dict) and `out` (the output folder).
    (DatasetDict's own methods return plain DatasetDicts, without them.)"""

    def __init__(self, parts: dict, manifest: dict, out: Path):
        super().__init__(parts)
        self.manifest, self.out = manifest, out


def load(out: str | os.PathLike) -> Result:
    """A finished job's output folder (prism, route, drift or irft) as a Result: each partition's Arrow
    stream shards memory-mapped (`datasets.Dataset.from_file`) and concatenated in shard order; an empty
    partition is an empty Dataset with the partition's columns. FileNotFoundError without a manifest."""
    out = Path(out)
    manifest = read_json(out / "manifest.json")
    return Result({part: _partition(out, manifest, part) for part in PARTITIONS[manifest.get("job", "prism")]},
                  manifest, out)


def _partition(out: Path, manifest: dict, part: str):
    ds = _datasets()
    files = [out / name for name in (manifest.get("files") or {}).get(part, [])]
    if files:
        shards = [ds.Dataset.from_file(str(f)) for f in files]
        return shards[0] if len(shards) == 1 else ds.concatenate_datasets(shards)
    import pyarrow as pa

    from curate import schema

    name = {"sft": schema.ROUTED if manifest.get("job", "prism") == "prism" else "drift", "rl": schema.ROUTED,
            "pairs": "pairs"}.get(part)
    empty = schema.arrow_schema(name).empty_table() if name else pa.table({})
    return ds.Dataset(empty)


def materialize(data: Any, out: str | os.PathLike, split: str | None = None, source: str = "dataset") -> list[str]:
    """The input paths for `data` (see the module docstring): paths as they are; data in memory written
    into `.OUT.inputs/` beside OUT. `split`: a DatasetDict's split (default "train"; "all": every split,
    one file each). TypeError for data of another kind; ValueError for a split the DatasetDict lacks."""
    if isinstance(data, (str, os.PathLike)):
        return [str(data)]
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return [str(d) for d in data]
    folder = Path(out).resolve().parent / f".{Path(out).name}.inputs"
    if isinstance(data, (list, tuple)) and all(isinstance(d, dict) for d in data):
        return [_write_jsonl(folder / f"{source}.jsonl", data)]
    ds = _datasets()
    if isinstance(data, ds.DatasetDict):
        chosen = list(data) if split == "all" else [split or "train"]
        missing = [s for s in chosen if s not in data]
        if missing:
            raise ValueError(f"the DatasetDict has no split {missing[0]!r}; its splits: {', '.join(data)} "
                             "(pass split=NAME or split='all')")
        return [_write_parquet(folder / f"{source}-{s}.parquet", data[s].with_format("arrow")[:]) for s in chosen]
    if isinstance(data, ds.Dataset):
        return [_write_parquet(folder / f"{source}.parquet", data.with_format("arrow")[:])]
    table = _frame_table(data)
    if table is None:
        raise TypeError(f"cannot read {type(data).__name__} as input: pass paths, a datasets.Dataset or "
                        "DatasetDict, a list of dicts, or a polars or pandas DataFrame")
    return [_write_parquet(folder / f"{source}.parquet", table)]


def _frame_table(data):
    """A polars or pandas DataFrame as an Arrow table (None for anything else)."""
    module = type(data).__module__.split(".")[0]
    if module == "polars":
        return data.to_arrow()
    if module == "pandas":
        import pyarrow as pa

        return pa.Table.from_pandas(data, preserve_index=False)
    return None


def _write_jsonl(path: Path, rows) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()
    return _write_if_changed(path, text)


def _write_parquet(path: Path, table) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return _write_if_changed(path, sink.getvalue().to_pybytes())


def _write_if_changed(path: Path, data: bytes) -> str:
    """Write atomically unless the file holds these bytes already (its sha256 is in the ingest cache key)."""
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return str(path)


def _run(job: str, data, out, split, source, options: dict) -> Result:
    from curate.jobs import CONFIGS, JOBS

    if split is not None and not isinstance(data, _datasets().DatasetDict):
        options["split"] = split   # a DatasetDict folder on disk: ingest picks the split
    cfg = CONFIGS[job](input=materialize(data, out, split, source), out=str(out), **options)
    JOBS[job](cfg).run()
    return load(out)


def prism(data, out: str | os.PathLike = "routed", *, split: str | None = None, source: str = "dataset",
          **options) -> Result:
    """`curate prism`: score every example by its gradient concentration under the probe model and route
    it to sft or rl. `options`: the prism flags by name (model, max_length, metric, quantile, stratify,
    control, ...; see `curate prism --help`). Returns Result {"sft", "rl"} with the manifest. ValueError
    (or curate's own errors, as the command line reports them) for bad options or input."""
    return _run("prism", data, out, split, source, options)


def drift(data, out: str | os.PathLike = "drift", *, split: str | None = None, source: str = "dataset",
          **options) -> Result:
    """`curate drift`: K rollouts per prompt, DRIFT returns and weights. Returns Result {"sft"}."""
    return _run("drift", data, out, split, source, options)


def irft(data, out: str | os.PathLike = "irft", *, split: str | None = None, source: str = "dataset",
         **options) -> Result:
    """`curate irft`: the generator's replies, implicit rewards and DPO pairs. Returns Result
    {"pairs", "stage_index"}."""
    return _run("irft", data, out, split, source, options)


def route(work: str | os.PathLike, out: str | os.PathLike, **options) -> Result:
    """`curate route`: re-route a finished prism run from its cache (WORK, default OUT/.work of that run),
    without model work. `options`: RouteConfig's fields (metric, quantile, threshold, reverse, seed,
    stratify, control, module_scale, bootstrap). Returns Result {"sft", "rl"}."""
    from curate.corpus.route import RouteConfig
    from curate.jobs.reroute import reroute

    reroute(work, out, RouteConfig(**options))
    return load(out)


def export(routed: str | os.PathLike, to: str, out: str | os.PathLike) -> dict:
    """`curate export`: write a routed folder as the files trainer `to` (trl, verl, openrlhf,
    llamafactory) reads; returns the export's manifest (its `files` name each file and row count)."""
    from curate.formats.export import export as run_export

    return run_export(routed, to, out)


def score(data, work: str | os.PathLike = "curate-score", *, split: str | None = None, source: str = "dataset",
          **options):
    """Per-example probe columns without routing or writing an output: id, source, source_index, format,
    n_tokens, n_loss_tokens, truncated, token_error, probe_loss (mean assistant-token NLL, nats),
    grad_norms (list<float32>, manifest order `modules`), grad_norm_total and the five metrics, one row
    per unique record in input order (a row whose tokenization failed has null probe columns and its
    token_error). Cached in WORK like a prism run's stages. Returns a datasets.Dataset."""
    from curate.jobs.score import score_table

    if split is not None and not isinstance(data, _datasets().DatasetDict):
        options["split"] = split
    return score_table(materialize(data, work, split, source), Path(work), options)
