"""OUT/report.html: one self-contained page (inline CSS, base64 PNG figures, no scripts, no external
resources) summarising a routed folder (`curate prism`, `curate route`) or a DRIFT folder (`curate drift`).

It stays cheap at any size: each shard is read for the few columns the page needs, and everything but
the per-row scores and numeric signal columns (8 bytes a row each) is reduced shard by shard to sums
and counters; messages are never read. The page is deterministic: the same folder gives the same bytes
(no dates, no paths but the manifest's, PNGs without a Software stamp; the manifest's timings and
cache counts are left out, so an identical rerun gives an identical report), and it
is written atomically next to manifest.json, never inside sft/ or rl/ (LLaMA-Factory rejects mixed folders)."""

from __future__ import annotations

import html
import json
import re
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.atomic import TMP_SUFFIX, atomic_path, read_arrow, read_json
from curate.report_plots import grouped_bars, norm_heatmaps, score_histograms, value_histograms
from curate.report_routing import (LENGTH, RoutingScan, attribution_section, diagnostics_section, examples_section,
                                   scatter_section, warnings_section)

log = logging.getLogger(__name__)
REPORT = "report.html"
PARTITIONS = ("sft", "rl", "pairs")   # pairs: `curate irft`
SIGNALS = ("weight", "return", "reward", "rm_score", "logp_gap")  # plus implicit_reward*, rm_score_*
TOP = 25  # rows shown per bar chart / table before the rest is summed into "other"


@dataclass
class Partition:
    """Running aggregates of one output partition (`scan_shard`): rows, routing scores, summed grad_norms,
    sources and numeric signal values."""

    rows: int = 0
    scores: list[np.ndarray] = field(default_factory=list)
    norm_sum: np.ndarray | None = None   # float64 sum of grad_norms over rows, in manifest module order
    norm_rows: int = 0
    sources: Counter = field(default_factory=Counter)
    signals: dict[str, list[np.ndarray]] = field(default_factory=dict)
    routing: RoutingScan = field(default_factory=RoutingScan)

    def score_array(self) -> np.ndarray:
        """Every finite routing score of the partition, shards in order (float64; empty without scores)."""
        return np.concatenate(self.scores) if self.scores else np.zeros(0)

    def signal_array(self, name: str) -> np.ndarray:
        """The finite values of signal column `name` over the partition's shards (float64; empty without any)."""
        return np.concatenate(self.signals.get(name, [])) if self.signals.get(name) else np.zeros(0)


@dataclass
class Summary:
    """What the report shows of one output folder: its manifest, each partition's aggregates and the
    quarantine reasons."""

    manifest: dict
    parts: dict[str, Partition]
    reasons: Counter   # (stage, reason with digits as N) -> quarantined rows

    @property
    def signal_names(self) -> list[str]:
        """The signal columns some partition has: in SIGNALS' order first, then the others sorted."""
        found = {n for p in self.parts.values() for n in p.signals}
        return [n for n in SIGNALS if n in found] + sorted(n for n in found if n not in SIGNALS)

    def norm_means(self) -> dict[str, np.ndarray]:
        """Per partition with norms, the mean grad_norms vector over its rows (float64, one value per manifest
        module)."""
        return {k: p.norm_sum / p.norm_rows for k, p in self.parts.items() if p.norm_rows}


def _is_signal(name: str) -> bool:
    return name in SIGNALS or name.startswith(("implicit_reward", "rm_score_"))


def _stream_schema(path: Path) -> pa.Schema:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).schema


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def _finite(column: pa.ChunkedArray) -> np.ndarray:
    values = column.drop_null().cast(pa.float64()).to_numpy()
    return values[np.isfinite(values)]


def scan_shard(path: Path, part: Partition, n_modules: int) -> None:
    """Add one shard's rows to its partition's running aggregates."""
    try:
        names = _stream_schema(path).names
        wanted = [c for c in names if c in ("score", "grad_norms", "source", "threshold", LENGTH) or _is_signal(c)]
        table = read_arrow(path, wanted) if wanted else None
        rows = table.num_rows if table is not None else read_arrow(path).num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Arrow IPC stream ({e})") from e
    part.rows += rows
    if table is None:
        return
    if "score" in names:
        part.scores.append(_finite(table.column("score")))
    if "source" in names:
        counts = pc.value_counts(table.column("source").fill_null("(none)")).to_pylist()
        part.sources.update({d["values"]: d["counts"] for d in counts})
    for name in (c for c in names if _is_signal(c) and _numeric(table.schema.field(c).type)):
        part.signals.setdefault(name, []).append(_finite(table.column(name)))
    part.routing.observe(table, path)
    if "grad_norms" in names and n_modules:
        norms = table.column("grad_norms").combine_chunks().drop_null()
        lengths = pc.list_value_length(norms).to_numpy(zero_copy_only=False)
        if np.any(lengths != n_modules):
            row = int(np.argmax(lengths != n_modules))
            raise ValueError(f"{path}: row {row} has {lengths[row]} grad_norms, manifest lists {n_modules} modules")
        values = pc.list_flatten(norms).to_numpy(zero_copy_only=False).reshape(len(norms), n_modules)
        total = values.sum(axis=0, dtype=np.float64)
        part.norm_sum = total if part.norm_sum is None else part.norm_sum + total
        part.norm_rows += len(norms)


def scan_quarantine(path: Path) -> Counter:
    """Quarantined rows by (stage, reason), digits folded to N so "message 3: ..." and "message 7: ..." group."""
    reasons: Counter = Counter()
    if not path.exists():
        return reasons
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not JSON ({e.msg})") from e
            reasons[(str(row.get("stage", "?")), re.sub(r"\d+", "N", str(row.get("reason", "?")))[:160])] += 1
    return reasons


def summarize(out: str | Path) -> Summary:
    """Scan output folder `out` for the report. FileNotFoundError without manifest.json; ValueError for a
    shard or quarantine line that cannot be read."""
    out = Path(out)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: no manifest, not a routed folder")
    manifest = read_json(manifest_path)
    n_modules = len(manifest.get("modules") or [])
    parts = {}
    for name in PARTITIONS:
        if (out / name).is_dir():
            parts[name] = Partition()
            for shard in sorted((out / name).glob("*.arrow")):
                scan_shard(shard, parts[name], n_modules)
    return Summary(manifest, parts, scan_quarantine(out / "quarantine" / "part-00000.jsonl"))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}.warn{color:#8a4b00}"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(table_id: str, headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(_num(c))}</td>' if isinstance(c, (int, float))
                                    else f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{_e(table_id)}"><tr>{head}</tr>{body}</table>'


def _figure(fig_id: str, uri: str, caption: str) -> str:
    return (f'<figure id="{_e(fig_id)}"><img src="{uri}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _top(counter: Counter, n: int = TOP) -> tuple[list, int]:
    """The n largest keys (ties in key order, for stable output) and the count of the rest."""
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return [k for k, _ in ranked[:n]], sum(v for _, v in ranked[n:])


def _overview(s: Summary) -> str:
    m, rows = s.manifest, []
    rows.append(["job", m.get("job", "prism")])
    model = m.get("model")
    if model is None and m.get("job") == "drift":
        model = {"name": "none (recorded outcomes)"}
    rows.append(["model", model.get("name", "?") if isinstance(model, dict) else model or "?"])
    for key in ("metric", "quantile", "threshold", "stratify", "control", "module_scale", "rule"):
        if key in (m.get("routing") or {}):
            rows.append([f"routing {key}", m["routing"][key]])
    rows += [[f"count {k}", v] for k, v in (m.get("counts") or {}).items()]
    for block in ("weights", "returns"):  # drift: ESS, clipping, success rate, mean return
        rows += [[f"{block} {k}", v] for k, v in (m.get(block) or {}).items() if isinstance(v, (int, float, str))]
    rows.append(["curate version", m.get("curate_version", "?")])
    return "<h2>Overview</h2>" + _table("overview", ["item", "value"], rows)


def _scores(s: Summary) -> str:
    scores = {k: p.score_array() for k, p in s.parts.items()}
    if not any(v.size for v in scores.values()):
        return ""
    routing = s.manifest.get("routing") or {}
    metric = score_label(routing)
    uri = score_histograms(scores, routing.get("threshold"), metric)
    line = ("dashed: the routing threshold" if routing.get("threshold") is not None
            else "one threshold per group (Routing diagnostics)")
    return "<h2>Score distribution</h2>" + _figure(
        "fig-scores", uri, f"{metric} per partition; {line} ({routing.get('rule', '')})")


def _norms(s: Summary) -> str:
    means, modules = s.norm_means(), s.manifest.get("modules") or []
    if not means or not modules:
        return ""
    uri = norm_heatmaps(modules, means, s.manifest.get("probe_map"))
    return "<h2>Gradient norms per layer</h2>" + _figure(
        "fig-norms", uri, "mean Frobenius norm of the loss gradient per projection matrix (rows: module, "
        "columns: layer), per partition on one log scale; last panel: log2 of the RL/SFT ratio")


def _sources(s: Summary) -> str:
    total = sum((p.sources for p in s.parts.values()), Counter())
    if not total:
        return ""
    labels, rest = _top(total)
    rows = [[src, *(s.parts[p].sources.get(src, 0) for p in s.parts), total[src]] for src in labels]
    if rest:
        rows.append([f"other ({len(total) - len(labels)} sources)",
                     *(sum(s.parts[p].sources.values()) - sum(s.parts[p].sources.get(x, 0) for x in labels)
                       for p in s.parts), rest])
    uri = grouped_bars({p: s.parts[p].sources for p in s.parts}, labels, "rows by source and partition")
    return ("<h2>Counts by source and partition</h2>" + _figure("fig-sources", uri, "rows per input file")
            + _table("counts-by-source", ["source", *s.parts, "total"], rows))


def _quarantine(s: Summary) -> str:
    if not s.reasons:
        return '<h2>Quarantine</h2><p class="note">No record was quarantined.</p>'
    keys, rest = _top(s.reasons)
    rows = [[stage, reason, s.reasons[(stage, reason)]] for stage, reason in keys]
    if rest:
        rows.append(["", f"other ({len(s.reasons) - len(keys)} reasons)", rest])
    labels = [f"{stage}: {reason}" for stage, reason in keys]
    uri = grouped_bars({"quarantine": Counter(dict(zip(labels, (s.reasons[k] for k in keys))))}, labels,
                       "quarantined records by stage and reason")
    return ("<h2>Quarantine</h2>" + _figure("fig-quarantine", uri, "quarantine reasons (digits shown as N)")
            + _table("quarantine-reasons", ["stage", "reason", "records"], rows))


def _signals(s: Summary) -> str:
    blocks, rows = [], []
    for name in s.signal_names:
        values = {p: part.signal_array(name) for p, part in s.parts.items()}
        if not any(v.size for v in values.values()):
            continue
        blocks.append(_figure(f"fig-{name}", value_histograms(name, values), f"{name} per partition"))
        rows += [[name, p, int(v.size), float(v.mean()), float(v.min()), float(v.max())]
                 for p, v in values.items() if v.size]
    if not blocks:
        return ""
    return ("<h2>Weights, returns and rewards</h2>" + "".join(blocks)
            + _table("signal-stats", ["column", "partition", "rows", "mean", "min", "max"], rows))


def score_label(routing: dict) -> str:
    """What the `score` column holds: the metric, or its length residual."""
    metric = routing.get("metric", "score")
    return f"{metric} residual after the length fit" if routing.get("control") == "length" else metric


def _scans(s: Summary) -> dict[str, RoutingScan]:
    return {k: p.routing for k, p in s.parts.items() if k in ("sft", "rl")}


def _routing(s: Summary) -> str:
    """The diagnostics' tables and the score-against-length scatter (routed folders)."""
    metric = score_label(s.manifest.get("routing") or {})
    scores = {k: p.score_array() for k, p in s.parts.items() if k in ("sft", "rl")}
    return diagnostics_section(s.manifest, _table) + scatter_section(scores, _scans(s), metric, _figure)


def render(s: Summary) -> str:
    """The page as a string: escaped text, inline CSS and data-URI images only."""
    job = s.manifest.get("job", "prism")
    parts = ", ".join(f"{k} {p.rows}" for k, p in s.parts.items())
    body = "".join([warnings_section(s.manifest), _overview(s), _scores(s), _routing(s), _norms(s),
                    attribution_section(s.manifest, _scans(s), _figure, _table), _sources(s),
                    examples_section(_scans(s), sum((p.sources for p in s.parts.values()), Counter()), _table),
                    _quarantine(s), _signals(s)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>curate report: {_e(job)}</title>'
            f"<style>{CSS}</style></head><body><h1>curate report: {_e(job)}</h1>"
            f'<p class="note">rows: {_e(parts)}</p>{body}</body></html>\n')


def write_report(out: str | Path) -> Path:
    """Write OUT/report.html atomically; raises on an unreadable folder (naming the file)."""
    page = render(summarize(out))
    path = Path(out) / REPORT
    for stale in path.parent.glob(f".{REPORT}.*{TMP_SUFFIX}"):  # left by a killed run
        stale.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def try_write_report(out: str | Path) -> Path | None:
    """For the jobs: the routed data and manifest are already committed when the report is drawn, and the
    report is only a view of them, so a failure here must not fail the job. It warns, removes a stale
    report (which would describe another run) and leaves `curate report --routed OUT` to retry."""
    try:
        return write_report(out)
    except Exception as e:  # noqa: BLE001 - any plotting/reading failure is reported, never fatal here
        (Path(out) / REPORT).unlink(missing_ok=True)
        log.warning(f"{Path(out) / REPORT} not written ({type(e).__name__}: {e}); "
                    f"the data is complete, retry with `curate report --routed {out}`")
        return None
