"""The stage contract: a config, the columns read, the columns written, and run(shard) -> table.

A per-shard stage returns only the columns it adds, one row per input row in the same order; the route
stage joins them. A stage never knows how it is scheduled."""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from importlib.metadata import PackageNotFoundError, version as installed_version
from typing import Any, Callable, ClassVar

import pyarrow as pa


# What Stage.libraries names: the code that turns text into tokens (a chat template runs on jinja2; a GGUF
# file's tokenizer is read by gguf), and the code that runs a model (a GGUF file's weights are dequantised
# by gguf)
TOKENIZER_LIBRARIES = ("transformers", "tokenizers", "jinja2", "gguf")
MODEL_LIBRARIES = ("torch", "transformers", "tokenizers", "gguf")


def no_effect(default: Any) -> Any:
    """A config field that never changes a stage's output beyond float rounding (batch sizes, worker
    counts): left out of the cache key, so changing it reuses the cached shards."""
    return field(default=default, metadata={"affects_results": False})


def model_field(default: Any = None, none_is_default: bool = True) -> Any:
    """A config field naming a model: in the cache key as the model's identity (name, GGUF file, sha256 of
    its files: weights, configs, tokenizer, chat template, code), so new weights or an edited config in the
    same folder invalidate the cache. none_is_default: None means the
    embedded default model (keyed by its identity); otherwise None means no model (keyed as None).
    default=MISSING: a required field."""
    return field(default=default, metadata={"model": "default" if none_is_default else "optional"})


def keyed(default: Any, key: Callable[[Any], Any]) -> Any:
    """A config field keyed by what it resolves to on this machine (`key(config)`), e.g. device "auto" by
    the device it picks: a cache made elsewhere with another resolution is not reused."""
    return field(default=default, metadata={"key": key})


def shard_rows(path: str) -> int:
    """Rows of a shard file (its schema and batch lengths only: memory-mapped)."""
    from curate.io.atomic import read_arrow

    return read_arrow(path).num_rows


def config_key(config) -> dict:
    """The cache-key form of a stage config: every field, nested configs included, except those marked
    no_effect; model fields by the model's identity; keyed fields by their resolution. A field added to a
    config counts unless marked, so a new option can never leave stale shards behind."""
    from curate import models

    out = {}
    for f in fields(config):
        if not f.metadata.get("affects_results", True):
            continue
        value = getattr(config, f.name)
        if "key" in f.metadata:
            value = f.metadata["key"](config)
        elif f.metadata.get("model") and (value is not None or f.metadata["model"] == "default"):
            value = models.identity_of(value, getattr(config, "trust_remote_code", False))
        elif is_dataclass(value):
            value = config_key(value)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


class Stage:
    """A per-shard stage (module doc): a subclass sets `name`, `reads` and `writes` and defines `run`;
    `config` is its options dataclass."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    writes: ClassVar[pa.Schema]
    runs_model: ClassVar[bool] = False   # on CUDA jobs its shards go to workers with the GPU resource

    def __init__(self, config):
        self.config = config

    version: ClassVar[dict] = {}  # bumped when the stage's code changes what it computes
    # the installed distributions whose code computes this stage's output (a model's forward, a tokenizer):
    # their versions are part of the cache key, so an upgrade never mixes its rows with cached ones
    libraries: ClassVar[tuple[str, ...]] = ()

    def identity(self) -> dict:
        """Everything that changes this stage's output: part of every shard's cache key (config_key of
        its config, the stage's code version and its libraries' versions)."""
        found = {name: _version_of(name) for name in self.libraries}
        return {"stage": self.name, "config": config_key(self.config), **self.version,
                **({"libraries": found} if found else {})}

    cost_unit: ClassVar[str] = "row"

    def cost(self, source: str) -> int | None:
        """The work one input shard (file `source`) holds, in `cost_unit`s, for the stage's progress bar
        (its rate and ETA); None: count shards. Read cheaply (a column or two)."""
        return None

    def describe(self) -> dict:
        """Facts about the computation worth keeping in the shard's marker and the manifest."""
        return {}

    def run(self, shard: pa.Table) -> pa.Table:
        """The stage's columns for one shard (the upstream shard's `reads` columns): exactly `writes`, one row
        per input row in input order (returned through `check`)."""
        raise NotImplementedError

    def check(self, shard: pa.Table, out: pa.Table) -> pa.Table:
        """Enforce the contract: exactly the declared columns, one row per input row."""
        if out.num_rows != shard.num_rows:
            raise RuntimeError(f"stage {self.name} returned {out.num_rows} rows for {shard.num_rows}")
        return out.cast(self.writes)


def _version_of(distribution: str) -> str | None:
    try:
        return installed_version(distribution)
    except PackageNotFoundError:
        return None
