"""Stage `weights`: DRIFT's importance weights, per prompt group, over the whole corpus.

The KL-regularised objective max E[R] - beta KL(pi || pi_ref) has the optimum pi* ∝ pi_ref exp(R/beta).
Samples come from pi_ref, so weighted SFT on them with w_i = exp(R_i/beta) / Z(x) projects pi* onto the
policy, where Z(x) is estimated by the group of samples of the same prompt x:

    w_i = exp(R_i / beta) / mean_j exp(R_j / beta)      (mean weight 1 in every group)

computed in log space (logsumexp), so beta -> 0 or large returns never overflow: beta = 0 is the limit,
the group's weight spread evenly over its best samples. Like `route`, this is cheap and global (a group
can span shards), so it runs on every invocation from the cached rollouts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALL_FAIL = ("keep", "drop")


@dataclass(frozen=True)
class WeightsConfig:
    """Options of the weights (the fields' comments). ValueError for beta < 0, an all_fail other than keep
    or drop, or max_weight <= 0."""

    beta: float = 0.1                  # temperature of exp(R / beta)
    all_fail: str = "keep"             # a group with no success: keep (as DRIFT's code does) or drop
    max_weight: float | None = None    # clip weights above this (mean weight is then below 1)

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.all_fail not in ALL_FAIL:
            raise ValueError(f"all_fail must be keep or drop, got {self.all_fail!r}")
        if self.max_weight is not None and self.max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {self.max_weight}")


def log_weights(returns, beta: float) -> np.ndarray:
    """log w_i = R_i/beta - log mean_j exp(R_j/beta) for one group."""
    r = np.asarray(returns, dtype=np.float64)
    n = len(r)
    if n == 0:
        return r
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = r / beta if beta > 0 else np.full(n, np.inf)
    if not np.isfinite(z).all():  # beta == 0 or so small that R/beta overflows: the hard-max limit
        top = r == r.max()
        return np.where(top, np.log(n / top.sum()), -np.inf)
    shifted = z - z.max()     # <= 0: exp cannot overflow, and the best sample has exp(0) = 1
    return shifted - np.log(np.exp(shifted).mean())   # equal returns give exactly 0


def group_weights(returns, beta: float) -> np.ndarray:
    """DRIFT's (Mu et al., 2026) importance weights of one prompt group, w_i = exp(R_i/beta) /
    mean_j exp(R_j/beta): one per return, mean 1 (`log_weights`, exponentiated)."""
    return np.exp(log_weights(returns, beta))


def ess(weights) -> float:
    """Effective sample size (sum w)^2 / sum w^2 (Kish, 1965): n for equal weights, 1 when one sample has them all."""
    w = np.asarray(weights, dtype=np.float64)
    sq = float((w * w).sum())
    return float(w.sum()) ** 2 / sq if sq > 0 else 0.0


@dataclass
class Weighted:
    """What `assign` returns: arrays with one entry per input row, in input order, and the corpus stats
    written into the manifest."""

    weight: np.ndarray        # per row (NaN where dropped)
    group_ess: np.ndarray     # per row: the ESS of its group
    keep: np.ndarray          # per row: False for rows of dropped all-fail groups
    stats: dict


def assign(groups, returns, success, cfg: WeightsConfig) -> Weighted:
    """Weights for every row, given its group key, return and success flag."""
    keys = np.asarray(groups)
    r = np.asarray(returns, dtype=np.float64)
    ok = np.asarray(success, dtype=bool)
    weight, group_ess = np.full(len(r), np.nan), np.full(len(r), np.nan)
    keep = np.ones(len(r), dtype=bool)
    stats = {"groups": 0, "groups_all_fail": 0, "groups_all_success": 0, "groups_dropped": 0,
             "rows_dropped": 0, "clipped": 0}
    group_sizes, group_values = [], []
    if len(r):
        _, inverse = np.unique(keys, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        for rows in np.split(order, bounds):
            stats["groups"] += 1
            all_fail = not ok[rows].any()
            stats["groups_all_fail"] += all_fail
            stats["groups_all_success"] += bool(ok[rows].all())
            if all_fail and cfg.all_fail == "drop":
                keep[rows] = False
                stats["groups_dropped"] += 1
                stats["rows_dropped"] += len(rows)
                continue
            w = group_weights(r[rows], cfg.beta)
            if cfg.max_weight is not None:
                stats["clipped"] += int((w > cfg.max_weight).sum())
                w = np.minimum(w, cfg.max_weight)
            weight[rows], group_ess[rows] = w, ess(w)
            group_sizes.append(len(rows))
            group_values.append(ess(w))
    kept = weight[keep]
    stats.update({
        "rows": int(keep.sum()),
        "ess": ess(kept),
        "ess_fraction": ess(kept) / len(kept) if len(kept) else None,   # None, not NaN: valid JSON
        "mean_weight": float(kept.mean()) if len(kept) else None,
        "max_weight_seen": float(kept.max()) if len(kept) else None,
        "mean_group_ess": float(np.mean(group_values)) if group_values else None,
        "mean_group_size": float(np.mean(group_sizes)) if group_sizes else None,
    })
    stats = {k: (int(v) if isinstance(v, (bool, np.integer)) else v) for k, v in stats.items()}
    return Weighted(weight, group_ess, keep, stats)
