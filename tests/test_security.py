"""Security: no pickle anywhere in curate, model folders run no code of their own and load no pickled
weights unless asked, and paths in manifests and state files cannot escape their folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from curate import models
from curate.cli import main
from curate.io.atomic import check_state_paths, inside
from curate.jobs.prism import STATE
from curate.jobs.reroute import reroute
from curate.corpus.route import RouteConfig

CURATE = Path(__file__).resolve().parents[1] / "curate"
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "gsm8k_prompt_completion.jsonl"
# Every way Python code commonly ends up unpickling bytes.
UNSAFE = re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bcPickle\b|\bdill\b|\bcloudpickle\b|torch\.load\("
                    r"|allow_pickle\s*=\s*True|read_pickle|joblib\.load|weights_only\s*=\s*False|\bshelve\b")


def test_no_pickle_in_the_code():
    hits = [f"{p.relative_to(CURATE.parent)}:{i}: {line.strip()}"
            for p in sorted(CURATE.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert hits == []


def test_the_scan_finds_what_it_looks_for():
    assert all(UNSAFE.search(s) for s in ("import pickle", "x = torch.load(f)", "np.load(f, allow_pickle=True)",
                                          "pd.read_pickle(p)", "torch.load(f, weights_only=False)"))
    assert not UNSAFE.search("use_safetensors=True  # .bin checkpoints are pickles")


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_pickled_weights_are_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(models.ModelError, match="no .safetensors or .gguf weights"):
        models.resolve(str(model_copy))


def test_safetensors_are_loaded_even_next_to_a_pickle(model_copy):
    # a .bin that would fail to load if anything tried to read it; the safetensors file is used
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    ref = models.resolve(str(model_copy))
    assert [p.name for p in ref.weight_files()] == ["model.safetensors"]
    model = models.load_model(ref)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_remote_code_needs_trust_remote_code(model_copy, config_file):
    path = model_copy / config_file
    cfg = json.loads(path.read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoTokenizer": ["evil.EvilTok", None]}
    path.write_text(json.dumps(cfg))
    (model_copy / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(models.ModelError, match="--trust-remote-code"):
        models.resolve(str(model_copy))
    ref = models.resolve(str(model_copy), trust_remote_code=True)
    assert ref.trust_remote_code and not models.resolve(None).trust_remote_code


def test_cli_trust_remote_code_is_off_by_default():
    from curate import config

    for cls in (config.PrismConfig, config.DriftConfig):
        assert cls().trust_remote_code is False
        assert cls().skip_bad_files is False


def test_inside(tmp_path):
    (tmp_path / "out" / "sft").mkdir(parents=True)
    assert inside(tmp_path / "out", "sft/part-00000.arrow") == (tmp_path / "out" / "sft" / "part-00000.arrow")
    for bad in ("../x.arrow", "sft/../../x", "/etc/passwd", str(tmp_path / "elsewhere")):
        with pytest.raises(ValueError, match="escapes"):
            inside(tmp_path / "out", bad)
    (tmp_path / "out" / "link").symlink_to(tmp_path)  # a symlink pointing out is resolved, then refused
    with pytest.raises(ValueError):
        inside(tmp_path / "out", "link/secret")


def test_manifest_paths_stay_inside_and_a_crafted_state_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    raw = tmp_path / "in.jsonl"
    raw.write_text("\n".join(DEMO.read_text().splitlines()[:6]) + "\n")
    monkeypatch.chdir(tmp_path)  # a relative --out: state.json then holds paths relative to this folder
    out = Path("routed")
    assert main(["prism", "--input", str(raw), "--out", str(out), "--model", tiny_model_dir,
                 "--max-length", "64", "--shard-size", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = [n for part in manifest["files"].values() for n in part]
    assert names and all(not Path(n).is_absolute() and inside(out, n).is_file() for n in names)
    state = json.loads((out / ".work" / STATE).read_text())
    check_state_paths(out / ".work", state)  # the real state passes

    assert main(["route", "--work", str(out / ".work"), "--out", "again"]) == 0

    for crafted in (str(tmp_path / "in.jsonl"), "routed/.work/../../in.jsonl", "in.jsonl"):
        state["probe"][0]["path"] = crafted  # points a reader outside the work folder
        (out / ".work" / STATE).write_text(json.dumps(state))
        with pytest.raises(ValueError, match="escapes"):
            reroute(out / ".work", tmp_path / "again", RouteConfig())
        assert main(["route", "--work", str(out / ".work"), "--out", "again"]) == 2


def test_remote_code_runs_only_with_the_flag(model_copy, tmp_path, monkeypatch):
    """A folder whose config maps to its own modelling code: refused by default (exit 2), and with
    --trust-remote-code the whole job runs through that code."""
    mark = tmp_path / "custom-code-ran"
    monkeypatch.setenv("CURATE_TEST_MARK", str(mark))
    (model_copy / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (model_copy / "modeling_custom.py").write_text(
        "import os, pathlib\nfrom transformers import LlamaForCausalLM\nfrom .configuration_custom import CustomConfig\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n"
        "        pathlib.Path(os.environ['CURATE_TEST_MARK']).write_text('ran')\n")
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                    "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model_copy / "config.json").write_text(json.dumps(cfg))
    args = ["prism", "--input", str(DEMO), "--limit", "2", "--max-length", "128", "--model", str(model_copy)]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2 and not mark.exists()
    assert main([*args, "--out", str(tmp_path / "trusted"), "--trust-remote-code"]) == 0
    assert mark.read_text() == "ran"
    manifest = json.loads((tmp_path / "trusted" / "manifest.json").read_text())
    assert manifest["counts"]["sft"] + manifest["counts"]["rl"] == 2
