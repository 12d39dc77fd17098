"""The stage contract: a config, the columns read, the columns written, and run(shard) -> table.

A per-shard stage returns only the columns it adds, one row per input row in the same order; the route
stage joins them. A stage never knows how it is scheduled."""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar

import pyarrow as pa


class Stage:
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    writes: ClassVar[pa.Schema]
    runs_model: ClassVar[bool] = False   # on CUDA jobs its shards go to workers with the GPU resource

    def __init__(self, config):
        self.config = config

    def identity(self) -> dict:
        """Everything that changes this stage's output: part of every shard's cache key."""
        return {"stage": self.name, "config": asdict(self.config)}

    def describe(self) -> dict:
        """Facts about the computation worth keeping in the shard's marker and the manifest."""
        return {}

    def run(self, shard: pa.Table) -> pa.Table:
        raise NotImplementedError

    def check(self, shard: pa.Table, out: pa.Table) -> pa.Table:
        """Enforce the contract: exactly the declared columns, one row per input row."""
        if out.num_rows != shard.num_rows:
            raise RuntimeError(f"stage {self.name} returned {out.num_rows} rows for {shard.num_rows}")
        return out.cast(self.writes)
