"""Cache keys are derived from the stage configs: changing any field of any stage config changes the key
of its shards, except fields marked as not affecting results (batch sizes, devices), which reuse them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from curate import generation, models
from curate.ingest.ingest import IngestConfig
from curate.stages.base import config_key
from curate.stages.configs import ContinuationConfig
from curate.stages.configs import PairScoresConfig
from curate.stages.configs import PrefixConfig
from curate.stages.configs import ProbeConfig
from curate.stages.configs import RewardConfig
from curate.stages.configs import RolloutConfig
from curate.stages.configs import TokenizeConfig

CONFIGS = {
    ProbeConfig: {}, TokenizeConfig: {}, PrefixConfig: {}, RewardConfig: {"reward_model": "rm"},
    PairScoresConfig: {}, RolloutConfig: {}, ContinuationConfig: {"stages": 2},
    generation.GenerationConfig: {}, IngestConfig: {"inputs": ["a.jsonl"]},
}
# a value unlike the default for each field (by name where the type allows few valid values)
OTHER = {"dtype": "bf16", "device": "cpu", "engine": "hf", "verifier": "exact", "modules": ("q", "o"),
         "allow_partial": True,
         "stage": 1, "top_p": 0.5, "format": "sharegpt", "split": "test", "inputs": ["b.jsonl"],
         "tools": str(Path(__file__).parent / "data" / "tools" / "airline_tools.json")}


@pytest.fixture(autouse=True)
def identities_by_name(monkeypatch):
    """Model fields are keyed by the model's identity: here its name, no weights to hash."""
    monkeypatch.setattr(models, "identity_of", lambda spec, trust=False: {"name": spec or "embedded", "trust": trust})
    real = models.resolve  # "other" (a changed model field) stands for the embedded model's structure
    monkeypatch.setattr(models, "resolve", lambda spec, trust=False: real(None if spec == "other" else spec, trust))


def changed(value, name):
    if name in OTHER:
        return OTHER[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, seed=value.seed + 1)
    return "other"  # str or None


@pytest.mark.parametrize("config_cls", list(CONFIGS), ids=lambda c: c.__name__)
def test_every_field_changes_the_key_unless_marked(config_cls):
    base = config_cls(**CONFIGS[config_cls])
    for f in dataclasses.fields(base):
        other = dataclasses.replace(base, **{f.name: changed(getattr(base, f.name), f.name)})
        if "key" in f.metadata:  # keyed by its resolution here (engine auto -> hf on a machine without vllm)
            assert config_key(other)[f.name] == f.metadata["key"](other), (config_cls.__name__, f.name)
            continue
        same = config_key(other) == config_key(base)
        assert same is (f.metadata.get("affects_results", True) is False), (config_cls.__name__, f.name)


def test_what_does_not_affect_results_is_declared_not_forgotten():
    unmarked = {(c.__name__, f.name) for c in CONFIGS for f in dataclasses.fields(c)
                if f.metadata.get("affects_results", True) is False}
    assert unmarked == {("ProbeConfig", "device"), ("ProbeConfig", "batch_tokens"), ("ProbeConfig", "allow_partial"),
                        ("RewardConfig", "device"),
                        ("RewardConfig", "batch_tokens"), ("PairScoresConfig", "device"),
                        ("PairScoresConfig", "batch_tokens"), ("GenerationConfig", "batch_tokens"),
                        ("IngestConfig", "parse_procs")}


def test_a_resolved_field_is_keyed_by_its_resolution():
    assert config_key(ProbeConfig(dtype="auto")) == config_key(ProbeConfig(dtype="fp32"))
    assert config_key(ProbeConfig(dtype="auto")) != config_key(ProbeConfig(dtype="bf16"))
    assert config_key(ProbeConfig())["model"] == {"name": "embedded", "trust": False}
    assert config_key(PairScoresConfig())["ref_model"] is None  # None: the same model as π, not the default
    # what the probe measures is keyed by the entries it resolves to, not by how they were asked for
    assert config_key(ProbeConfig(modules=("k", "q")))["modules"] == config_key(ProbeConfig(modules=("q", "k")))[
        "modules"] == [f"model.layers.{n}.self_attn.{m}_proj" for n in range(30) for m in "qk"]
    assert config_key(ProbeConfig(allow_partial=True)) == config_key(ProbeConfig())  # a covered model


def test_an_upgrade_of_the_code_that_computes_a_stage_is_a_new_key(monkeypatch):
    # torch's kernels, a model's forward in transformers, a tokenizer: an upgrade can change the numbers, so
    # the shards computed before it are not mixed with the rows computed after
    from curate.stages import base
    from curate.stages.probe import Probe
    from curate.stages.tokenize import Tokenize

    probe, tokenize = Probe(ProbeConfig()), Tokenize(TokenizeConfig())
    before = probe.identity(), tokenize.identity()
    assert before[0]["libraries"]["torch"] and before[1]["libraries"]["tokenizers"]
    real = base._version_of
    monkeypatch.setattr(base, "_version_of", lambda name: "9.9" if name == "transformers" else real(name))
    assert probe.identity() != before[0] and tokenize.identity() != before[1]
