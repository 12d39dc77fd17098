"""report.html: written by prism / route / drift next to manifest.json, self-contained (every image a PNG
data URI that decodes), its tables equal to independent polars/numpy computations over the shards, text
escaped, bytes deterministic, failures named; and, when chromium is installed, every image renders."""

import base64
import html
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from matplotlib.image import imread

from curate.cli import main
from curate.config import DriftConfig, PrismConfig
from curate.jobs.drift import run_drift
from curate.io.atomic import read_arrow, write_arrow
from curate.jobs.prism import run_prism
from curate.jobs.reroute import reroute
from curate.report import REPORT, summarize, try_write_report, write_report
from curate.corpus.route import RouteConfig
from tests.conftest import REPO

DEMO = REPO / "data" / "demo"
ODD_NAME = 'gsm8k <i>&"q".jsonl'   # a source name that must be escaped in the page


class Page(HTMLParser):
    """Every tag with its attributes, and each table's cell text by table id."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.tables, self._table, self._cell = [], {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def rows(self, table_id: str) -> list[dict]:
        header, *body = self.tables[table_id]
        return [dict(zip(header, row)) for row in body]

    def figure_ids(self) -> set[str]:
        return {a["id"] for t, a in self.tags if t == "figure"}


def page(out: Path) -> Page:
    return Page((out / REPORT).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    alf = (DEMO / "alfworld_knowagent.jsonl").read_text().splitlines()[:6]
    gsm = (DEMO / "gsm8k_prompt_completion.jsonl").read_text().splitlines()[:7]
    no_reply = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    (folder / "alfworld.jsonl").write_text("\n".join(alf) + "\n")
    (folder / ODD_NAME).write_text("\n".join(gsm + ['{"prompt": "broken', no_reply, no_reply]) + "\n")
    return folder


@pytest.fixture(scope="module")
def routed(raw, tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("prism") / "routed"
    run_prism(PrismConfig(input=[str(raw)], out=str(out), model=tiny_model_dir, max_length=256,
                          batch_tokens=2048, shard_size=4, device="cpu"))
    return out


@pytest.fixture(scope="module")
def drift(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drift") / "drift"
    run_drift(DriftConfig(input=[str(DEMO / "alfworld_knowagent.jsonl")], out=str(out), verifier="recorded",
                          limit=12, shard_size=5))
    return out


def frame(out: Path, columns: list[str]) -> pl.DataFrame:
    """Every row of sft/ and rl/ with its partition, read independently of curate (polars)."""
    frames = [pl.read_ipc_stream(f, columns=columns).with_columns(pl.lit(f.parent.name).alias("part"))
              for part in ("sft", "rl") for f in sorted((out / part).glob("*.arrow"))]
    return pl.concat(frames)


def test_prism_writes_report_next_to_manifest_and_keeps_partitions_pure(routed):
    assert (routed / REPORT).is_file() and (routed / "manifest.json").is_file()
    for part in ("sft", "rl"):
        files = list((routed / part).iterdir())
        assert files and all(f.suffix == ".arrow" for f in files)   # LLaMA-Factory rejects mixed folders
    assert not [p for p in routed.iterdir() if p.name.endswith(".tmp")]


def test_self_contained_and_every_image_is_a_decodable_png(routed):
    p = page(routed)
    imgs = [a for t, a in p.tags if t == "img"]
    assert len(imgs) == len(p.figure_ids()) >= 5
    assert p.figure_ids() >= {"fig-scores", "fig-norms", "fig-sources", "fig-quarantine", "fig-reward"}
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,") and a["alt"]
        png = imread(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])), format="png")
        assert png.shape[0] > 100 and png.shape[1] > 100 and png.std() > 0   # drawn, not blank
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe", "object")]
    assert not [v for _, a in p.tags for k, v in a.items() if k in ("src", "href") and not v.startswith("data:")]


def test_counts_by_source_equal_polars_group_by(routed):
    expected = frame(routed, ["source"]).group_by("source", "part").len()
    table = page(routed).rows("counts-by-source")
    got = {(r["source"], part): int(r[part]) for r in table for part in ("sft", "rl") if int(r[part])}
    assert got == {(r["source"], r["part"]): r["len"] for r in expected.iter_rows(named=True)}
    assert len(table) == 2 and sum(int(r["total"]) for r in table) == expected["len"].sum()


def test_quarantine_reasons_count_every_quarantined_record(routed):
    manifest = json.loads((routed / "manifest.json").read_text())
    rows = page(routed).rows("quarantine-reasons")
    assert sum(int(r["records"]) for r in rows) == manifest["counts"]["quarantined"] == 3
    by_reason = {r["reason"]: int(r["records"]) for r in rows}
    assert by_reason["no assistant turn"] == 2   # the two equal bad records group under one reason


def test_reward_stats_equal_polars(routed):
    df = frame(routed, ["reward"]).drop_nulls()
    stats = {r["partition"]: r for r in page(routed).rows("signal-stats") if r["column"] == "reward"}
    for part, group in df.group_by("part"):
        assert int(stats[part[0]]["rows"]) == group.height
        assert float(stats[part[0]]["mean"]) == pytest.approx(group["reward"].mean(), abs=1e-5)


def test_norm_means_and_scores_equal_numpy_over_all_shards(routed):
    summary = summarize(routed)
    manifest = json.loads((routed / "manifest.json").read_text())
    assert len({p.name for p in (routed / "sft").glob("*.arrow")}) > 1   # aggregation spans shards
    for part in ("sft", "rl"):
        table = pa.concat_tables([read_arrow(f) for f in sorted((routed / part).glob("*.arrow"))])
        norms = np.array(table.column("grad_norms").to_pylist(), dtype=np.float64)
        assert norms.shape[1] == len(manifest["modules"])
        np.testing.assert_allclose(summary.norm_means()[part], norms.mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(summary.parts[part].score_array(), table.column("score").to_numpy())


def test_text_is_escaped(routed):
    text = (routed / REPORT).read_text(encoding="utf-8")
    assert ODD_NAME not in text and "<i>" not in text
    assert html.escape(str(Path(ODD_NAME).name)) in text
    assert any(r["source"].endswith(ODD_NAME) for r in page(routed).rows("counts-by-source"))


def test_same_folder_same_bytes_wherever_it_lies(routed, tmp_path):
    first = (routed / REPORT).read_bytes()
    assert write_report(routed).read_bytes() == first
    copy = tmp_path / "copy"
    shutil.copytree(routed, copy, ignore=shutil.ignore_patterns(".work", REPORT))
    assert write_report(copy).read_bytes() == first


def test_reroute_rewrites_report_even_with_an_empty_partition(routed, tmp_path):
    out = tmp_path / "all_sft"
    manifest = reroute(routed / ".work", out, RouteConfig(quantile=1.0))
    assert manifest["counts"]["rl"] == 0
    p = page(out)
    overview = {r["item"]: r["value"] for r in p.rows("overview")}
    assert overview["routing threshold"] == f"{manifest['routing']['threshold']:.6g}"
    assert overview["count sft"] == str(manifest["counts"]["sft"])
    assert {"fig-scores", "fig-norms"} <= p.figure_ids()


def test_drift_report_plots_weights_and_returns(drift):
    p = page(drift)
    assert {"fig-weight", "fig-return", "fig-sources"} <= p.figure_ids()
    assert not {"fig-scores", "fig-norms"} & p.figure_ids()
    df = frame(drift, ["weight", "return"])
    stats = {r["column"]: r for r in p.rows("signal-stats")}
    for col in ("weight", "return"):
        assert int(stats[col]["rows"]) == df.height
        assert float(stats[col]["mean"]) == pytest.approx(df[col].mean(), abs=1e-5)
        assert float(stats[col]["max"]) == pytest.approx(df[col].max(), abs=1e-5)


def test_new_reward_columns_are_plotted_when_present(routed, tmp_path):
    out = tmp_path / "rewarded"
    shutil.copytree(routed, out, ignore=shutil.ignore_patterns(".work"))
    added = []
    for f in sorted(out.glob("*/part-*.arrow")):
        table = read_arrow(f)
        values = np.linspace(-1, 1, table.num_rows, dtype=np.float32) + len(added)
        write_arrow(f, table.append_column("implicit_reward_chosen", pa.array(values)))
        added.append(values)
    assert main(["report", "--routed", str(out)]) == 0
    p = page(out)
    assert "fig-implicit_reward_chosen" in p.figure_ids()
    rows = [r for r in p.rows("signal-stats") if r["column"] == "implicit_reward_chosen"]
    assert sum(int(r["rows"]) for r in rows) == sum(a.size for a in added)


def test_unreadable_shard_is_named_and_never_loses_data(routed, tmp_path, capsys):
    out = tmp_path / "broken"
    shutil.copytree(routed, out, ignore=shutil.ignore_patterns(".work"))
    bad = sorted((out / "rl").glob("*.arrow"))[0]
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match=str(bad)):
        write_report(out)
    assert main(["report", "--routed", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert try_write_report(out) is None                   # what the jobs call: warns, does not raise
    assert "not written" in capsys.readouterr().err
    assert not (out / REPORT).exists()                     # the stale report of the other run is gone
    assert (out / "manifest.json").exists() and len(list((out / "sft").glob("*.arrow"))) > 1


def test_missing_manifest_is_a_usage_error(tmp_path, capsys):
    assert main(["report", "--routed", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err


CHECK = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length;
  const out = document.createElement("pre"); out.id = "render-check";
  out.textContent = `rendered ${ok} of ${imgs.length}`; document.body.appendChild(out);
});</script></body>"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


def decoded_images(text: str) -> list:
    """Every <img> of the page decoded from its data URI (matplotlib's PNG reader): (height, width, channels)."""
    import base64
    import io
    import re

    from matplotlib.image import imread

    sources = re.findall(r'<img src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    return [imread(io.BytesIO(base64.b64decode(s.split(",", 1)[1])), format="png").shape for s in sources]


@pytest.mark.parametrize("which", ["routed", "drift"])
def test_every_image_renders(which, request, tmp_path):
    """In headless chromium when one is installed; else every image decodes as a non-empty PNG."""
    out = request.getfixturevalue(which)
    text = (out / REPORT).read_text(encoding="utf-8")
    binary = chromium()
    if binary is None:
        shapes = decoded_images(text)
        assert len(shapes) >= 3 and all(h > 0 and w > 0 for h, w, *_ in shapes)
        return
    probe = tmp_path / "probe.html"   # a copy with the check injected: the report itself has no script
    probe.write_text(text.replace("</body>", CHECK, 1), encoding="utf-8")
    n = text.count("<img ")
    result = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert f"rendered {n} of {n}" in result.stdout, result.stderr[-2000:]
    assert n >= 3
