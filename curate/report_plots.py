"""The report's figures, drawn with matplotlib's object API (no pyplot: no global figure state, no GUI
backend) and returned as PNG data URIs.

PNG bytes are reproducible: the Agg renderer is deterministic for the same data and matplotlib version,
and the only varying metadata (the "Software" text chunk) is dropped."""

from __future__ import annotations

import base64
import io
import math
import re
from collections import Counter

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure

COLORS = {"sft": "#1f77b4", "rl": "#d62728"}
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def to_data_uri(fig: Figure) -> str:
    """The figure as a `data:image/png;base64,...` URI (100 dpi, no Software stamp: deterministic bytes)."""
    FigureCanvasAgg(fig)  # attach the raster canvas explicitly: no backend selection through pyplot
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _color(part: str) -> str:
    return COLORS.get(part, "#555555")


def score_histograms(scores: dict[str, np.ndarray], threshold: float | None, metric: str) -> str:
    """One panel per partition on shared bins, each with the routing threshold as a vertical line."""
    parts = [p for p, s in scores.items() if s.size]
    both = np.concatenate([scores[p] for p in parts])
    bins = threshold_bins(both, threshold, min(50, max(10, int(math.sqrt(both.size)))))
    fig = Figure(figsize=(8, 2.4 * len(parts)), layout="constrained")
    axes = fig.subplots(len(parts), 1, sharex=True, squeeze=False)[:, 0]
    for ax, part in zip(axes, parts):
        ax.hist(scores[part], bins=bins, color=_color(part), alpha=0.85)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylabel(f"{part} (n={scores[part].size})")
    axes[-1].set_xlabel(metric)
    return to_data_uri(fig)


def threshold_bins(values: np.ndarray, threshold: float | None, n: int) -> np.ndarray:
    """About n equal-width bin edges covering `values`, one of them at `threshold` (when it is finite and
    inside the range; the next float above it), so no bin mixes rows routed to both sides."""
    lo, hi = float(values.min()), float(values.max())
    if threshold is None or not math.isfinite(threshold) or not lo <= threshold <= hi or hi == lo:
        return np.histogram_bin_edges(values, bins=n)
    width = (hi - lo) / n
    below, above = math.ceil((threshold - lo) / width), math.ceil((hi - threshold) / width)
    edges = threshold + width * np.arange(-below, above + 1)
    # numpy's bins are closed on the left, and a score equal to the threshold is routed with the scores
    # below it: the edge goes just above the threshold, so that score lands left of the line
    edges[below] = np.nextafter(threshold, math.inf)
    if edges[-1] <= hi:  # the maximum belongs to the last bin, whose right edge is inclusive
        edges = np.append(edges, edges[-1] + width)
    return edges


def score_scatter(points: dict[str, tuple[np.ndarray, np.ndarray]], length: str, metric: str) -> str:
    """Score against length (log axis), one colour per partition; `points`: partition -> (lengths, scores)."""
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    for part, (x, y) in points.items():
        if len(x):
            ax.scatter(np.maximum(x, 1), y, s=6, color=_color(part), alpha=0.6, label=f"{part} (n={len(x)})")
    ax.set_xscale("log")
    ax.set_xlabel(f"{length} (log)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def share_profiles(by_role: dict[str, dict[str, float]], by_layer: dict[str, dict[str, float]]) -> str:
    """Mean share of the squared gradient norm per role (bars) and per layer (lines), one colour per
    partition; each argument: partition -> {role or layer: share}."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    roles = list(dict.fromkeys(r for shares in by_role.values() for r in shares))
    width = 0.8 / max(1, len(by_role))
    for j, (part, shares) in enumerate(by_role.items()):
        left.bar(np.arange(len(roles)) + j * width, [shares.get(r, 0.0) for r in roles], width,
                 color=_color(part), label=part)
        layers = sorted(by_layer[part], key=int)
        right.plot([int(k) for k in layers], [by_layer[part][k] for k in layers], color=_color(part), label=part)
    left.set_xticks(np.arange(len(roles)) + 0.4 - width / 2, roles, fontsize=7, rotation=45)
    left.set_ylabel("mean share of ‖∇‖²")
    left.set_title("by role", fontsize=9, loc="left")
    right.set_xlabel("layer")
    right.set_title("by layer", fontsize=9, loc="left")
    right.legend(fontsize=8)
    return to_data_uri(fig)


def module_grid(modules: list[str], probe_map: dict | None = None) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """Rows (PRISM roles from the manifest's probe_map, else module kinds such as self_attn.q_proj),
    columns (layer numbers) and each module's (row, col). Without either, one row indexed by position."""
    placed = {name: (role, layer["layer"]) for layer in (probe_map or {}).get("layers", [])
              for role, name in layer["roles"].items()}
    if modules and all(m in placed for m in modules):
        kinds = list(dict.fromkeys(placed[m][0] for m in modules))
        layers = sorted({placed[m][1] for m in modules})
        return kinds, layers, [(kinds.index(placed[m][0]), layers.index(placed[m][1])) for m in modules]
    parsed = [LAYER.search(m) for m in modules]
    if not modules or not all(parsed):
        return ["module"], list(range(len(modules))), [(0, i) for i in range(len(modules))]
    kinds = list(dict.fromkeys(p.group(2) for p in parsed))
    layers = sorted({int(p.group(1)) for p in parsed})
    col = {n: j for j, n in enumerate(layers)}
    return kinds, layers, [(kinds.index(p.group(2)), col[int(p.group(1))]) for p in parsed]


def _grid(values: np.ndarray, shape: tuple[int, int], cells: list[tuple[int, int]]) -> np.ndarray:
    grid = np.full(shape, np.nan)
    for (r, c), v in zip(cells, values):
        grid[r, c] = v
    return grid


def norm_heatmaps(modules: list[str], means: dict[str, np.ndarray], probe_map: dict | None = None) -> str:
    """Mean gradient norm per (role, layer) for each partition on one log colour scale, and the log2
    ratio RL/SFT: where the concentrated examples' updates are relatively larger."""
    kinds, layers, cells = module_grid(modules, probe_map)
    grids = {p: _grid(m, (len(kinds), len(layers)), cells) for p, m in means.items()}
    panels = list(grids)
    if {"sft", "rl"} <= set(grids):
        with np.errstate(divide="ignore", invalid="ignore"):
            grids["log2 rl/sft"] = np.log2(grids["rl"] / grids["sft"])
    fig = Figure(figsize=(max(6.0, 0.28 * len(layers) + 3), (0.35 * len(kinds) + 1.2) * len(grids)),
                 layout="constrained")
    axes = fig.subplots(len(grids), 1, squeeze=False)[:, 0]
    finite = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in (grids[p] for p in panels)])
    shared = LogNorm(finite.min(), finite.max()) if finite.size and finite.max() > finite.min() else None
    for ax, (name, grid) in zip(axes, grids.items()):
        if name in panels:
            im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=shared, interpolation="nearest")
        else:
            lim = float(np.nanmax(np.abs(grid[np.isfinite(grid)]), initial=0.0)) or 1.0
            im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                           norm=TwoSlopeNorm(0.0, -lim, lim))
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        ax.set_title(name if name not in panels else f"{name}: mean ‖∇W‖_F", fontsize=9, loc="left")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        step = max(1, len(layers) // 16)
        ax.set_xticks(range(0, len(layers), step), [str(n) for n in layers[::step]], fontsize=7)
    axes[-1].set_xlabel("layer")
    return to_data_uri(fig)


def grouped_bars(counts: dict[str, Counter], labels: list[str], title: str) -> str:
    """Horizontal bars, one group per label, one bar per partition (partitions stacked)."""
    fig = Figure(figsize=(8, 0.3 * len(labels) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    for part, counter in counts.items():
        widths = np.array([counter.get(label, 0) for label in labels], dtype=float)
        ax.barh(y, widths, left=left, color=_color(part), label=part)
        left += widths
    ax.set_yticks(y, [_short(label) for label in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title(title, fontsize=9, loc="left")
    if len(counts) > 1:
        ax.legend(fontsize=8)
    return to_data_uri(fig)


def _short(label: str, n: int = 60) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


def value_histograms(name: str, values: dict[str, np.ndarray]) -> str:
    """Overlaid histograms of one numeric column (weight, return, reward, ...) per partition."""
    parts = [p for p, v in values.items() if v.size]
    both = np.concatenate([values[p] for p in parts])
    bins = np.histogram_bin_edges(both, bins=min(40, max(5, int(math.sqrt(both.size)))))
    fig = Figure(figsize=(6, 2.6), layout="constrained")
    ax = fig.subplots()
    for part in parts:
        ax.hist(values[part], bins=bins, color=_color(part), alpha=0.6, label=f"{part} (n={values[part].size})")
    ax.set_xlabel(name)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    return to_data_uri(fig)
