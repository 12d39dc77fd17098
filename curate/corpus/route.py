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


STRATIFY = ("none", "source", "format")
CONTROLS = ("none", "length")
MODULE_SCALES = ("none", "numel")


@dataclass
class RouteConfig:
    """Routing options (the fields' comments). ValueError for an unknown metric, stratum, control or
    module scale, a quantile outside [0, 1], a threshold that is not finite or a negative bootstrap."""

    metric: str = "gini"                 # gini | cv | kurtosis | magnitude | random
    quantile: float = 0.5                # threshold = this quantile of the corpus scores ...
    threshold: float | None = None       # ... unless a fixed threshold is given
    reverse: bool = False                # send high scores to sft instead (PRISM's ablation)
    seed: int = 0                        # for the `random` control metric, the bootstrap and the length fit
    stratify: str = "none"               # source | format: the quantile is taken within each group
    control: str = "none"                # length: route on the score's residual after a fit on log length
    module_scale: str = "none"           # numel: each norm / sqrt(d_out * d_in) before the metrics
    bootstrap: int = 200                 # resamples for the threshold's interval and route_confidence (0: none)

    def __post_init__(self):
        if self.metric not in schema.METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(schema.METRICS)}")
        for name, allowed in (("stratify", STRATIFY), ("control", CONTROLS), ("module_scale", MODULE_SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"--threshold must be a finite number, got {self.threshold}")
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.threshold is not None and (self.stratify != "none" or self.control != "none"):
            raise ValueError("a fixed --threshold is a value on the metric's scale for the whole corpus: it "
                             "cannot be combined with --stratify (a quantile per group) or --control length "
                             "(residuals); use --quantile")


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


def simple_decision(records: pa.Table, probe: pa.Table, threshold: float, config: RouteConfig) -> dict:
    """The decision of a plain split at one `threshold` for a shard's rows that have gradient norms:
    every metric (stored ones read, the rest computed), score, route and threshold; see `routed_rows`."""
    keep = pc.is_valid(probe.column("grad_norms"))
    records, probe = records.filter(keep), probe.filter(keep)
    stored = {m: probe.column(m).to_numpy() for m in schema.NORM_METRICS if m in probe.column_names}
    computed = scores(records.column("id").to_pylist(), probe.column("grad_norms"), config.seed,
                      tuple(m for m in schema.METRICS if m not in stored))
    metrics = {m: stored[m] if m in stored else computed[m] for m in schema.METRICS}
    return {**metrics, "score": metrics[config.metric], "threshold": np.full(records.num_rows, threshold),
            "route": assign(metrics[config.metric], threshold, config.reverse)}


def routed_rows(records: pa.Table, tokens: pa.Table, probe: pa.Table, decision: dict,
                signals: pa.Table | None = None, prefix_rows: str = "rl") -> pa.Table:
    """Join one shard's columns, keep rows with gradient norms and add their `decision`: per kept row,
    in order, every metric of schema.METRICS, `score`, `route`, `threshold` and, when decided,
    `route_confidence` and `top_modules` (corpus.decide). Signal columns (rm_score, Prefix-RFT) are
    joined; Prefix-RFT ones are kept on the rows `prefix_rows` names (rl | all) and null elsewhere. A column
    no stage computed is null; ValueError for a column the routed schema does not declare (never dropped
    silently). One row per kept row, the routed schema's columns."""
    keep = pc.invert(pc.is_null(probe.column("grad_norms")))
    if probe.column("grad_norms").null_count:  # else filtering would only copy every column
        records, tokens, probe = records.filter(keep), tokens.filter(keep), probe.filter(keep)
    n = records.num_rows
    # every record column, `metadata` included; one an older ingest cache lacks is null below
    cols = {name: records.column(name) for name in schema.columns(schema.RECORD) if name in records.column_names}
    cols["prompt"] = chat.prompt_column(records.column("messages"))
    cols.update({name: tokens.column(name) for name in schema.TOKEN_COLUMNS})
    cols.update({name: probe.column(name) for name in schema.PROBE_COLUMNS})
    cols.update(decision)
    target = schema.arrow_schema(schema.ROUTED)
    if signals is not None:
        signals = signals.filter(keep) if len(signals) != n else signals
        cols.update({name: signals.column(name) for name in signals.column_names})
    if prefix_rows == "rl" and "demo" in cols:
        rl = pa.array(np.asarray(cols["route"]) == "rl")
        for name in schema.PREFIX_COLUMNS:
            cols[name] = pc.if_else(rl, cols[name], pa.scalar(None, cols[name].type))
    schema.check_declared(cols, schema.ROUTED)  # a signal stage's column must not vanish from the output
    return pa.table({name: cols[name] if name in cols else pa.nulls(n, target.field(name).type)
                     for name in target.names}).cast(target)
