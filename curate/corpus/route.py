"""Stage `route`: the only stage that decides. Concentration scores from the cached gradient norms,
a corpus-level threshold, and the sft/rl partitions. Cheap, so re-routing never recomputes gradients.

Score <= threshold -> sft (diffuse update), above -> rl (concentrated update); --reverse swaps them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import chat, concentration, schema

PARTITIONS = ("sft", "rl")  # score <= threshold -> sft, above -> rl (--reverse swaps them)


@dataclass
class RouteConfig:
    """Routing options (the fields' comments). ValueError for an unknown metric, a quantile outside [0, 1]
    or a threshold that is not finite."""

    metric: str = "gini"                 # gini | cv | kurtosis | magnitude | random
    quantile: float = 0.5                # threshold = this quantile of the corpus scores ...
    threshold: float | None = None       # ... unless a fixed threshold is given
    reverse: bool = False                # send high scores to sft instead (PRISM's ablation)
    seed: int = 0                        # for the `random` control metric

    def __post_init__(self):
        if self.metric not in schema.METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(schema.METRICS)}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"--threshold must be a finite number, got {self.threshold}")


def scores(ids: list[str], grad_norms: pa.ChunkedArray | pa.Array, seed: int,
           names: tuple[str, ...] = schema.METRICS) -> dict[str, np.ndarray]:
    """The metrics `names` (default: all) for rows that have gradient norms (callers drop the rest
    first), as the float32 values the columns hold: the threshold is then one of those values and
    compares exactly."""
    g = pc.list_flatten(grad_norms).to_numpy(zero_copy_only=False)  # float32: each metric upcasts as it needs
    g = g.reshape(len(grad_norms), -1) if len(grad_norms) else g.reshape(0, 0)
    return {k: v.astype(np.float32) for k, v in concentration.all_metrics(g, ids, seed, names).items()}


def norm_metric_columns(grad_norms: pa.ChunkedArray | pa.Array) -> dict[str, pa.Array]:
    """schema.NORM_METRICS as float32 columns, null where the norms are (rows the probe could not
    score). The probe stage stores them beside its norms, per shard, so routing (and every re-route)
    reads them instead of recomputing; they are the values `scores` gives."""
    valid = pc.is_valid(grad_norms).to_numpy(zero_copy_only=False)
    values = scores([], grad_norms.drop_null() if grad_norms.null_count else grad_norms, 0, schema.NORM_METRICS)
    columns = {}
    for name, v in values.items():
        full = np.zeros(len(valid), np.float32)
        full[valid] = v
        columns[name] = pa.array(full, mask=~valid)
    return columns


def corpus_threshold(values: np.ndarray, config: RouteConfig) -> float:
    """A fixed threshold, or the smallest score s with at least quantile·n scores <= s, so that the
    default median split sends half the corpus to each side (ties go together, to sft)."""
    if config.threshold is not None:
        return float(config.threshold)
    if len(values) == 0:
        return float("nan")
    return float(np.quantile(values, config.quantile, method="inverted_cdf"))


def assign(values: np.ndarray, threshold: float, reverse: bool) -> np.ndarray:
    """The partition of each score: "sft" where value <= threshold, else "rl" (swapped by `reverse`); a
    string array shaped like `values`. A NaN score goes to rl (to sft with `reverse`)."""
    low = values <= threshold
    return np.where(low ^ reverse, "sft", "rl")


def routed_rows(records: pa.Table, tokens: pa.Table, probe: pa.Table, threshold: float,
                config: RouteConfig, signals: pa.Table | None = None, prefix_rows: str = "rl",
                known: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Join one shard's columns, keep rows with gradient norms, add scores and the route. Signal columns
    (rm_score, Prefix-RFT) are joined; Prefix-RFT ones are kept on the rows `prefix_rows` names (rl | all)
    and null elsewhere. A column no stage computed is null; ValueError for a column the routed schema
    does not declare (never dropped silently). `known`: metrics already computed for the
    kept rows (the routing score from the corpus pass), not computed again."""
    keep = pc.invert(pc.is_null(probe.column("grad_norms")))
    if probe.column("grad_norms").null_count:  # else filtering would only copy every column
        records, tokens, probe = records.filter(keep), tokens.filter(keep), probe.filter(keep)
    ids = records.column("id").to_pylist()
    known = {m: probe.column(m).to_numpy() for m in schema.NORM_METRICS if m in probe.column_names} | (known or {})
    metrics = scores(ids, probe.column("grad_norms"), config.seed, tuple(m for m in schema.METRICS if m not in known))
    metrics = {m: known[m] if m in known else metrics[m] for m in schema.METRICS}
    # every record column, `metadata` included; one an older ingest cache lacks is null below
    cols = {name: records.column(name) for name in schema.columns(schema.RECORD) if name in records.column_names}
    cols["prompt"] = chat.prompt_column(records.column("messages"))
    cols.update({name: tokens.column(name) for name in schema.TOKEN_COLUMNS})
    cols.update({name: probe.column(name) for name in schema.PROBE_COLUMNS})
    cols.update(metrics)
    cols["score"] = metrics[config.metric]
    cols["route"] = assign(metrics[config.metric], threshold, config.reverse)
    cols["threshold"] = np.full(len(ids), threshold)
    target = schema.arrow_schema(schema.ROUTED)
    if signals is not None:
        signals = signals.filter(keep) if len(signals) != len(ids) else signals
        cols.update({name: signals.column(name) for name in signals.column_names})
    if prefix_rows == "rl" and "demo" in cols:
        rl = pa.array(cols["route"] == "rl")
        for name in schema.PREFIX_COLUMNS:
            cols[name] = pc.if_else(rl, cols[name], pa.scalar(None, cols[name].type))
    schema.check_declared(cols, schema.ROUTED)  # a signal stage's column must not vanish from the output
    n = len(ids)
    return pa.table({name: cols[name] if name in cols else pa.nulls(n, target.field(name).type)
                     for name in target.names}).cast(target)
