"""A model's identity (the cache keys' and manifests' sha256) covers every file that changes what it computes
or how it tokenizes, and no per-process cache outlives the files it read."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from curate import models
from tests.conftest import tiny_llama


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_an_edited_config_is_a_new_model_in_the_same_process(model_copy):
    # users edit config.json in place (rope scaling, a norm's eps): same weights, other numbers
    ref = models.resolve(str(model_copy))
    before, model = models.identity(ref)["sha256"], models.load_model(ref)
    _edit_json(model_copy / "config.json", rms_norm_eps=0.25)
    assert models.identity(ref)["sha256"] != before
    again = models.load_model(ref)
    assert again is not model and again.config.rms_norm_eps == 0.25
    assert models.skeleton(ref).config.rms_norm_eps == 0.25


def test_an_edited_tokenizer_or_template_is_a_new_model(model_copy):
    ref = models.resolve(str(model_copy))
    before, tok = models.identity(ref)["sha256"], models.load_tokenizer(ref)
    template = "{{ messages[0]['content'] }}"
    if (model_copy / "chat_template.jinja").exists():  # transformers' own file for it, which wins
        (model_copy / "chat_template.jinja").write_text(template)
    else:
        _edit_json(model_copy / "tokenizer_config.json", chat_template=template)
    assert models.identity(ref)["sha256"] != before
    assert models.load_tokenizer(ref) is not tok
    assert models.load_tokenizer(ref).chat_template == template


def test_replaced_weights_are_loaded_again(model_copy):
    ref = models.resolve(str(model_copy))
    old = models.load_model(ref).model.embed_tokens.weight.clone()
    before = models.identity(ref)["sha256"]
    vocab = old.shape[0]
    tiny_llama(vocab_size=vocab, seed=1).save_pretrained(model_copy)  # a new file replaces the old one
    new = models.load_model(ref).model.embed_tokens.weight
    assert models.identity(ref)["sha256"] != before
    assert not torch.equal(new, old)
    assert torch.equal(new, tiny_llama(vocab_size=vocab, seed=1).model.embed_tokens.weight)


def test_a_superseded_model_is_freed_and_every_model_cache_follows_the_files(model_copy):
    import gc
    import weakref

    from curate import generation, rewards

    ref = models.resolve(str(model_copy))
    old = weakref.ref(models.load_model(ref))
    tiny_llama(vocab_size=models.load_model(ref).config.vocab_size, seed=2).save_pretrained(model_copy)
    models.load_model(ref)
    gc.collect()
    assert old() is None  # a GPU worker would otherwise hold both models' weights
    # every per-process cache of what a model folder holds is one of these (not a plain lru_cache by ref)
    for cached in (rewards.load_reward_model, generation._vllm_engine, models.load_tokenizer, models.skeleton,
                   models.load_model):
        assert isinstance(getattr(cached.cache_clear, "__self__", None), OrderedDict), cached.__name__


def test_a_named_template_in_its_subfolder_is_part_of_the_model(model_copy):
    # transformers reads additional_chat_templates/*.jinja (a `tool_use` template renders records with tools)
    ref = models.resolve(str(model_copy))
    before = models.identity(ref)["sha256"]
    (model_copy / "additional_chat_templates").mkdir()
    (model_copy / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")
    assert models.identity(ref)["sha256"] != before


def test_files_that_do_not_define_the_model_leave_its_identity(model_copy):
    ref = models.resolve(str(model_copy))
    before = models.identity(ref)["sha256"]
    (model_copy / "README.md").write_text("# a model card\n")
    (model_copy / "pytorch_model.bin").write_bytes(b"a pickle, never read")
    assert models.identity(ref)["sha256"] == before


def test_a_gguf_model_is_its_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF and some bytes")
    (tmp_path / "config.json").write_text("{}")  # beside it, but a GGUF file holds its own config
    ref = models.resolve(str(gguf))
    assert models.identity(ref)["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
