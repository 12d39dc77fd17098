"""Is the split PRISM's signal, or length, or the source? Diagnostics and controls of one routing.

Everything here works on per-row arrays of the routed rows (one value per row, corpus order) and is
recomputed on every routing from the cached columns, so `curate route` re-runs it in seconds:

- Spearman's ρ of the routing score with length and the probe's own outputs, overall and per source;
- the split per source and per format, and truncated rows per partition;
- the agreement of the five metrics' median splits (PRISM's ablation table) from one run;
- a seeded bootstrap of each threshold (its interval) and, per row, `route_confidence`: the share of
  bootstrap thresholds that keep the row's route;
- plain-language warnings when length or the source predicts the split, or many rows were cut;
- the length control: the score's residual after a robust fit on log n_loss_tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

COVARIATES = ("n_tokens", "n_loss_tokens", "probe_loss", "grad_norm_total")
LENGTHS = ("n_tokens", "n_loss_tokens")
LENGTH_WARN = 0.5      # |ρ(score, length)| from which the split is said to follow length
SOURCE_WARN = 0.8      # share of rows whose route their source's majority route predicts ...
SOURCE_LIFT = 0.5      # ... and how much better that is than the larger partition alone (source_dependence)
MIN_ROWS = 10          # rows from which a rank correlation is read as a trend (3 rows give only +-0.5 or +-1)
TRUNCATED_WARN = 0.2   # share of routed rows cut to --max-length
FIT_ROWS = 2000        # rows the length fit uses at most (Theil-Sen is quadratic in them)


@dataclass
class Groups:
    """Rows grouped by a label (source file, format): `codes` (one int per row) index `names` (sorted)."""

    codes: np.ndarray
    names: list[str]

    @classmethod
    def of(cls, labels: list[str]) -> Groups:
        names = sorted(set(labels))
        index = {name: i for i, name in enumerate(names)}
        return cls(np.array([index[label] for label in labels], dtype=np.int32), names)

    @classmethod
    def one(cls, n: int) -> Groups:
        """Every row in one group (no stratification)."""
        return cls(np.zeros(n, dtype=np.int32), ["all"])

    def members(self):
        """(name, row indices) of every group that has rows."""
        for g, name in enumerate(self.names):
            rows = np.flatnonzero(self.codes == g)
            if rows.size:
                yield name, rows


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation of two equal-length arrays (scipy.stats.spearmanr, ties averaged),
    rounded to 4 digits; None for fewer than 3 rows, a constant column or a non-finite value."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return round(float(stats.spearmanr(x, y).statistic), 4)


def correlations(score: np.ndarray, covariates: dict[str, np.ndarray], sources: Groups) -> dict:
    """ρ(score, each covariate), overall and per source: {"overall": {cov: ρ}, "by_source": {src: {cov: ρ}}}."""
    overall = {c: spearman(score, v) for c, v in covariates.items()}
    by_source = {name: {c: spearman(score[rows], v[rows]) for c, v in covariates.items()}
                 for name, rows in sources.members()}
    return {"overall": overall, "by_source": by_source}


def splits(rl: np.ndarray, groups: Groups) -> dict[str, dict]:
    """Per group: rows, sft, rl and the RL share (`rl`: one bool per row, True for an rl row)."""
    out = {}
    for name, rows in groups.members():
        n_rl = int(rl[rows].sum())
        out[name] = {"rows": int(rows.size), "sft": int(rows.size - n_rl), "rl": n_rl,
                     "rl_share": round(n_rl / rows.size, 4)}
    return out


def median_split(values: np.ndarray) -> np.ndarray:
    """True (rl) for rows above the corpus median (the inverted-CDF median, as routing takes it)."""
    return values > np.quantile(values, 0.5, method="inverted_cdf")


def agreement(metrics: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """For every pair of metrics, the share of rows their median splits route the same way."""
    routes = {m: median_split(v) for m, v in metrics.items()}
    return {a: {b: round(float(np.mean(routes[a] == routes[b])), 4) for b in routes} for a in routes}


def source_dependence(rl: np.ndarray, sources: Groups) -> dict:
    """How well the source alone predicts the route: each source's majority route, the share of rows that
    route matches (`accuracy`), the share the larger partition alone would match (`baseline`), and the
    lift over it, (accuracy - baseline) / (1 - baseline): 0 when the sources say nothing the split's
    balance does not, 1 when they decide it."""
    majority, matched = {}, 0
    for name, rows in sources.members():
        n_rl = int(rl[rows].sum())
        majority[name] = "rl" if 2 * n_rl > rows.size else "sft"
        matched += max(n_rl, rows.size - n_rl)
    if not len(rl):
        return {"accuracy": None, "baseline": None, "lift": None, "majority": majority}
    accuracy, baseline = matched / len(rl), max(int(rl.sum()), int((~rl).sum())) / len(rl)
    lift = (accuracy - baseline) / (1 - baseline) if baseline < 1 else 0.0
    return {"accuracy": round(accuracy, 4), "baseline": round(baseline, 4), "lift": round(lift, 4),
            "majority": majority}


def length_residuals(score: np.ndarray, n_loss_tokens: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """The score with its length trend removed: residual = score - (a + b * ln n_loss_tokens), where (b, a)
    is the Theil-Sen line (scipy.stats.theilslopes: the median of pairwise slopes, robust to outliers) of
    score on ln n_loss_tokens over at most FIT_ROWS rows drawn with `seed`. Returns float32 residuals
    (one per row) and the fit {intercept, slope, fit_rows, method}."""
    x = np.log(np.maximum(np.asarray(n_loss_tokens, dtype=np.float64), 1.0))
    y = np.asarray(score, dtype=np.float64)
    rows = np.arange(len(y))
    if len(rows) > FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, FIT_ROWS, replace=False))
    if len(rows) < 2 or np.ptp(x[rows]) == 0:
        slope, intercept = 0.0, float(np.median(y)) if len(y) else 0.0
    else:
        fit = stats.theilslopes(y[rows], x[rows])
        slope, intercept = float(fit.slope), float(fit.intercept)
    residual = (y - (intercept + slope * x)).astype(np.float32)
    return residual, {"intercept": intercept, "slope": slope, "fit_rows": int(len(rows)),
                      "method": "Theil-Sen on ln(n_loss_tokens)"}


def bootstrap_thresholds(values: np.ndarray, quantile: float, reps: int, seed: int) -> np.ndarray:
    """`reps` bootstrap replicates of the corpus threshold: the inverted-CDF `quantile` of `values`
    resampled with replacement (numpy Generator seeded with `seed`). float64 array (reps,)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    return np.array([np.quantile(values[rng.integers(0, n, n)], quantile, method="inverted_cdf")
                     for _ in range(reps)], dtype=np.float64)


def confidence(values: np.ndarray, threshold: float, replicates: np.ndarray) -> np.ndarray:
    """Per row, the share of `replicates` (bootstrap thresholds) under which the row keeps the side of
    `threshold` it is on (value <= threshold or above). float32, one per row."""
    boot = np.sort(replicates)
    at_or_above = len(boot) - np.searchsorted(boot, values, side="left")   # replicates t* >= value
    low_side = values <= threshold
    share = np.where(low_side, at_or_above, len(boot) - at_or_above) / len(boot)
    return share.astype(np.float32)


def interval(replicates: np.ndarray) -> dict:
    """The bootstrap's 95% percentile interval and standard deviation of a threshold."""
    lo, hi = np.quantile(replicates, [0.025, 0.975])
    return {"interval": [float(lo), float(hi)], "std": float(np.std(replicates))}


def warnings(diag: dict) -> list[str]:
    """Plain-language warnings from a diagnostics dict (corpus.decide), in the light of the routing's own
    `stratify` and `control` (never advising what is already done)."""
    stratify, control = diag.get("stratify", "none"), diag.get("control", "none")
    out = _length_warnings(diag, stratify, control)
    dep, by_source = diag["source_dependence"], diag["splits"]["by_source"]
    if (stratify != "source" and len(by_source) > 1 and dep["accuracy"] is not None
            and dep["accuracy"] >= SOURCE_WARN and dep["lift"] >= SOURCE_LIFT):
        parts = ", ".join(f"{s} -> {dep['majority'][s]} ({by_source[s][dep['majority'][s]]}/{by_source[s]['rows']})"
                          for s in by_source)
        out.append(f"the split follows the source: {parts}; the source alone predicts {dep['accuracy']:.0%} of "
                   f"routes (the larger partition alone {dep['baseline']:.0%}). `curate route --stratify source` "
                   "takes the quantile within each source.")
    if stratify != "none":
        flat = [g for g, s in diag["splits"][f"by_{stratify}"].items() if s["rows"] and not (s["sft"] and s["rl"])]
        if flat:
            out.append(f"{len(flat)} {stratify} group(s) went whole to one partition (too few rows or tied scores "
                       f"to split): {', '.join(flat[:5])}{' and more' if len(flat) > 5 else ''}.")
    totals = {p: sum(s[p] for s in by_source.values()) for p in ("sft", "rl")}
    empty = [p for p, n in totals.items() if not n]
    if diag["rows"] and empty:
        out.append(f"every routed row went to {'rl' if empty == ['sft'] else 'sft'}: the {empty[0]} partition is "
                   "empty (a fixed --threshold outside the scores, a quantile of 0 or 1, or tied scores).")
    trunc = diag["truncated"]
    routed = diag["rows"]
    n_trunc = trunc["sft"] + trunc["rl"]
    if routed and n_trunc / routed >= TRUNCATED_WARN:
        out.append(f"{n_trunc} of {routed} routed rows ({n_trunc / routed:.0%}) were cut to --max-length "
                   f"(sft {trunc['sft']}, rl {trunc['rl']}): their scores measure the kept tokens only; "
                   "raise --max-length if the model allows.")
    return out


def _length_warnings(diag: dict, stratify: str, control: str) -> list[str]:
    """|rho(score, length)| >= LENGTH_WARN: overall, or within each source (of MIN_ROWS rows or more) when
    every source is split on its own."""
    advice = ("" if control == "length" else " Compare `curate route --control length`"
              + ("" if stratify == "source" else " and `--stratify source`") + ".")
    after = " even after --control length" if control == "length" else ""
    sizes = {s: v["rows"] for s, v in diag["splits"]["by_source"].items()}
    if stratify == "source":  # each source is split on its own: length matters within one
        out = []
        for source, rhos in diag["spearman"]["by_source"].items():
            rho = next((rhos[n] for n in LENGTHS if rhos.get(n) is not None and abs(rhos[n]) >= LENGTH_WARN), None)
            if rho is not None and sizes.get(source, 0) >= MIN_ROWS:
                out.append(f"within {source} the score follows length{after}: Spearman rho(score, length) = "
                           f"{rho:+.2f}.{advice}")
        return out
    for name in LENGTHS:
        rho = diag["spearman"]["overall"].get(name)
        if rho is not None and abs(rho) >= LENGTH_WARN and diag["rows"] >= MIN_ROWS:
            within = {s: r[name] for s, r in diag["spearman"]["by_source"].items()
                      if r.get(name) is not None and sizes.get(s, 0) >= MIN_ROWS}
            inside = "; within each source: " + ", ".join(f"{s} {r:+.2f}" for s, r in within.items()) if within else ""
            return [f"the score follows length{after}: Spearman rho(score, {name}) = {rho:+.2f}{inside}.{advice}"]
    return []
