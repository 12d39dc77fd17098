"""notebooks/inspect_routed.ipynb runs top to bottom (nbclient, a real Jupyter kernel) against a routed
folder built with the tiny random Llama (the demo's own data, several shards), and what it shows equals
an independent pyarrow/numpy reading of the shards."""

import json
import re

import nbformat
import numpy as np
import pyarrow as pa
import pytest
from nbclient import NotebookClient

from curate.config import PrismConfig
from curate.io.atomic import read_arrow
from curate.jobs.prism import run_prism
from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "inspect_routed.ipynb"
MARK = "NOTEBOOK-STATE:"
# Appended to the in-memory copy only: exposes what the notebook computed, for comparison.
DUMP = f"""print("{MARK}" + json.dumps({{"most": most["id"].to_list(), "least": least["id"].to_list(),
    "split": dict(zip(split["route"].to_list(), split["rows"].to_list())), "layer_norms": layer_norms.to_dicts(),
    "role_shares": role_shares.to_dicts(), "warnings": diag["warnings"]}}))"""


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_model_dir):
    raw = tmp_path_factory.mktemp("demo-slice")
    for name, n in (("alfworld_knowagent.jsonl", 5), ("gsm8k_prompt_completion.jsonl", 7)):
        lines = (REPO / "data" / "demo" / name).read_text().splitlines()[:n]
        (raw / name).write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("nb") / "routed"
    run_prism(PrismConfig(input=[str(raw)], out=str(out), model=tiny_model_dir, max_length=256,
                          batch_tokens=2048, shard_size=4, device="cpu"))
    return out


@pytest.fixture(scope="module")
def executed(routed, tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DUMP))
    env = pytest.MonkeyPatch()
    env.setenv("CURATE_ROUTED", str(routed))
    env.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))   # the kernel inherits os.environ
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        env.undo()
    return nb


def outputs(nb, kind: str) -> list[str]:
    return [o.get("text", "") if kind == "stream" else o for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if o.output_type == kind]


def rows(routed) -> list[dict]:
    tables = [read_arrow(f, ["id", "score", "grad_norms", "messages"]).append_column(
        "route", pa.array([part] * read_arrow(f).num_rows)) for part in ("sft", "rl")
        for f in sorted((routed / part).glob("*.arrow"))]
    return pa.concat_tables(tables).to_pylist()


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_and_matches_the_shards(routed, executed):
    text = "".join(outputs(executed, "stream"))
    state = json.loads(next(line for line in text.splitlines() if line.startswith(MARK))[len(MARK):])
    manifest = json.loads((routed / "manifest.json").read_text())
    assert state["split"] == {"sft": manifest["counts"]["sft"], "rl": manifest["counts"]["rl"]}
    assert len(list((routed / "sft").glob("*.arrow"))) > 1   # row positions span shards

    everything = rows(routed)
    ranked = sorted(everything, key=lambda r: (-r["score"], r["id"]))
    assert state["most"] == [r["id"] for r in ranked[:2]]
    assert state["least"] == [r["id"] for r in ranked[-2:][::-1]]
    for r in (ranked[0], ranked[-1]):   # their text is shown, read through datasets
        assert f"id {r['id']}" in text and r["messages"][0]["content"][:60] in text

    layer_of = [int(re.search(r"layers\.(\d+)\.", m).group(1)) for m in manifest["modules"]]
    for part in ("sft", "rl"):
        g = np.array([r["grad_norms"] for r in everything if r["route"] == part], dtype=np.float64)
        for entry in state["layer_norms"]:
            cols = [i for i, n in enumerate(layer_of) if n == entry["layer"]]
            assert entry[part] == pytest.approx(np.linalg.norm(g[:, cols], axis=1).mean(), rel=1e-9)
    roles = manifest["probe_map"]["roles"]
    for entry in state["role_shares"]:
        for part in ("sft", "rl"):
            sq = np.array([r["grad_norms"] for r in everything if r["route"] == part], dtype=np.float64) ** 2
            share = (sq / sq.sum(axis=1, keepdims=True)).mean(axis=0)
            assert entry[part] == pytest.approx(sum(share[i] for i, r in enumerate(roles) if r == entry["role"]))
    assert state["warnings"] == manifest["diagnostics"]["warnings"]
    for warning in state["warnings"]:
        assert f"WARNING: {warning}" in text


def test_notebook_draws_its_plots(executed):
    images = [o for o in outputs(executed, "display_data") if "image/png" in o.get("data", {})]
    assert len(images) == 3   # score distribution, score against length, per-layer norms
    assert not outputs(executed, "error")
