"""The report's routing sections (prism and `curate route` folders): the diagnostics' warnings first,
then their tables, score against length, where the gradient lands, and example rows per source.

Like the rest of the report it reads shards once for a few columns: per row it keeps the length beside
the score (8 bytes); the example rows are chosen while scanning (a few per source) and only their
messages are read back."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.corpus.attribution import Entries, norm_matrix, shares
from curate.io.atomic import read_arrow
from curate.report_plots import score_scatter, share_profiles

LENGTH = "n_loss_tokens"
EXAMPLE_SOURCES = 10   # sources quoted at most, the largest first
EXCERPT = 300          # characters of a message shown
SCATTER_POINTS = 4000  # per partition, evenly spaced in corpus order
KINDS = ("most concentrated", "least concentrated", "nearest the threshold")


@dataclass
class RoutingScan:
    """What one partition's shards give the routing sections: lengths aligned with the scores, summed
    shares of the squared gradient norm per grad_norms entry, and the example rows per (source, kind):
    (key, shard path, row) with the smallest key."""

    lengths: list[np.ndarray] = field(default_factory=list)
    share_sum: np.ndarray | None = None
    share_rows: int = 0
    picks: dict[tuple[str, str], tuple[float, str, int]] = field(default_factory=dict)

    def observe(self, table: pa.Table, path: Path) -> None:
        """Add one shard (its score, source, threshold, n_loss_tokens and grad_norms columns, when present)."""
        names = table.column_names
        if "score" in names and LENGTH in names:
            valid = pc.is_finite(table.column("score")).to_numpy(zero_copy_only=False)
            self.lengths.append(table.column(LENGTH).to_numpy(zero_copy_only=False)[valid].astype(np.float64))
        if "grad_norms" in names:
            norms = table.column("grad_norms").drop_null()
            if len(norms):
                total = shares(norm_matrix(norms)).sum(axis=0)
                self.share_sum = total if self.share_sum is None else self.share_sum + total
                self.share_rows += len(norms)
        if not {"score", "source", "threshold"} <= set(names):
            return
        score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        gap = np.abs(score - table.column("threshold").to_numpy(zero_copy_only=False))
        for source in pc.unique(table.column("source")).to_pylist():
            rows = np.flatnonzero(pc.equal(table.column("source"), source).to_numpy(zero_copy_only=False))
            for kind, key in zip(KINDS, (-score, score, gap)):
                row = int(rows[np.argmin(key[rows])])
                if (source, kind) not in self.picks or key[row] < self.picks[(source, kind)][0]:
                    self.picks[(source, kind)] = (float(key[row]), str(path), row)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def warnings_section(manifest: dict) -> str:
    """The diagnostics' warnings, before everything else."""
    warnings = (manifest.get("diagnostics") or {}).get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<h2>Warnings</h2><ul id="warnings" class="warn">{items}</ul>'


def diagnostics_section(manifest: dict, table) -> str:
    """ρ of the score with length and the probe's outputs, splits per source and format, truncation,
    the metrics' agreement and the threshold's bootstrap interval; `table(id, headers, rows)` draws one."""
    d = manifest.get("diagnostics")
    if not d:
        return ""
    covs = list(d["spearman"]["overall"])
    rho = [["all rows", *(d["spearman"]["overall"][c] for c in covs)]]
    rho += [[s, *(r[c] for c in covs)] for s, r in d["spearman"]["by_source"].items()]
    fmt = lambda v: "n/a" if v is None else round(v, 3)  # noqa: E731
    out = ["<h2>Routing diagnostics</h2>",
           f'<p class="note">Spearman rho of the routing score ({_e(manifest["routing"].get("metric"))}'
           f'{", length-controlled" if manifest["routing"].get("control") == "length" else ""}) with:</p>',
           table("spearman", ["rows", *covs], [[r[0], *(fmt(v) for v in r[1:])] for r in rho])]
    for by, label in (("by_source", "source"), ("by_format", "format")):
        rows = [[k, v["rows"], v["sft"], v["rl"], v["rl_share"]] for k, v in d["splits"][by].items()]
        out.append(table(f"split-{label}", [label, "rows", "sft", "rl", "rl share"], rows))
    out.append(table("truncated", ["partition", "rows cut to --max-length"], [[k, v] for k, v in d["truncated"].items()]))
    metrics = list(d["agreement"])
    if metrics:
        out.append('<p class="note">Agreement of the metrics\' median splits (share of rows routed alike; '
                   "PRISM's ablation):</p>")
        out.append(table("agreement", ["", *metrics], [[a, *(d["agreement"][a][b] for b in metrics)] for a in metrics]))
    groups = d["threshold"]["groups"]
    rows = [[g, v["rows"], v["threshold"], *(v["interval"] or ["n/a", "n/a"])] for g, v in groups.items()]
    out.append(f'<p class="note">Threshold per group and its 95% bootstrap interval '
               f'({d["threshold"]["bootstrap"]} resamples; route_confidence is each row\'s share of resamples that '
               "keep its route):</p>")
    out.append(table("threshold", ["group", "rows", "threshold", "2.5%", "97.5%"], rows))
    return "".join(out)


def scatter_section(scores: dict[str, np.ndarray], scans: dict[str, RoutingScan], metric: str, figure) -> str:
    """Score against n_loss_tokens per partition (evenly thinned to SCATTER_POINTS)."""
    points = {}
    for part, scan in scans.items():
        lengths = np.concatenate(scan.lengths) if scan.lengths else np.zeros(0)
        if lengths.size and lengths.size == scores[part].size:
            step = max(1, lengths.size // SCATTER_POINTS)
            points[part] = (lengths[::step], scores[part][::step])
    if not points:
        return ""
    return "<h2>Score and length</h2>" + figure("fig-scatter", score_scatter(points, LENGTH, metric),
                                                 f"{metric} against assistant tokens, per partition")


def attribution_section(manifest: dict, scans: dict[str, RoutingScan], figure, table) -> str:
    """Mean share of the squared gradient norm per role and per layer, sft against rl."""
    entries = Entries.of(manifest.get("modules") or [], manifest.get("probe_map"))
    by_role, by_layer = {}, {}
    for part, scan in scans.items():
        if scan.share_rows and scan.share_sum is not None and len(scan.share_sum) == len(entries.names):
            mean = scan.share_sum / scan.share_rows
            by_role[part] = _sum_by(mean, entries.roles)
            by_layer[part] = _sum_by(mean, [str(x) for x in entries.layers])
    if not by_role:
        return ""
    roles = list(dict.fromkeys(r for v in by_role.values() for r in v))
    rows = [[r, *(round(by_role[p].get(r, 0.0), 4) for p in by_role)] for r in roles]
    return ("<h2>Where the gradient lands</h2>"
            + figure("fig-shares", share_profiles(by_role, by_layer),
                     "mean share of each example's squared gradient norm, per role and per layer")
            + table("shares-by-role", ["role", *by_role], rows))


def _sum_by(values: np.ndarray, keys: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v, k in zip(values, keys):
        out[k] = out.get(k, 0.0) + float(v)
    return out


def examples_section(scans: dict[str, RoutingScan], source_rows: dict[str, int], table) -> str:
    """Per source (the EXAMPLE_SOURCES largest) and partition: the most and least concentrated rows and
    the row nearest the threshold, with excerpts of their first user and last assistant turns."""
    sources = sorted(source_rows, key=lambda s: (-source_rows[s], s))[:EXAMPLE_SOURCES]
    rows = []
    for source in sources:
        for part, scan in scans.items():
            for kind in KINDS:
                if (source, kind) in scan.picks:
                    _, path, row = scan.picks[(source, kind)]
                    rows.append([source, part, kind, *_excerpt(path, row)])
    if not rows:
        return ""
    return ("<h2>Example rows</h2>" + table(
        "examples", ["source", "partition", "which", "score", "route_confidence", "tokens", "user", "assistant"], rows))


def _excerpt(path: str, row: int) -> list:
    table = read_arrow(path)   # memory-mapped: only the row's wanted cells are read
    columns = [c for c in ("score", "route_confidence", "n_tokens", "messages") if c in table.column_names]
    values = table.select(columns).slice(row, 1).to_pylist()[0]
    messages = values.get("messages") or []
    user = next((m["content"] or "" for m in messages if m["role"] == "user"), "")
    reply = next((m["content"] or "" for m in reversed(messages) if m["role"] == "assistant"), "")
    confidence = values.get("route_confidence")
    return [round(values.get("score", float("nan")), 4), "n/a" if confidence is None else round(confidence, 3),
            values.get("n_tokens", 0), _clip(user), _clip(reply)]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT else text[:EXCERPT - 1] + "…"
