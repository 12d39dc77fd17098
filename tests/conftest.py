"""Shared fixtures: a tiny random Llama (2 layers) that stands in for the probe model in unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real public datasets (each folder has its SOURCE.md: origin, licence, fields), shipped with the tests
REAL_DATA = REPO / "tests" / "data" / "real"
# verl and OpenRLHF, whose dataset classes load our exports in the consumer tests, live apart from the
# environment (make setup: .venv/consumers), after its own packages on the path: they cannot shadow them
CONSUMERS = Path(sys.prefix) / "consumers"
if CONSUMERS.is_dir() and str(CONSUMERS) not in sys.path:
    sys.path.append(str(CONSUMERS))


def tiny_llama(vocab_size: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def real_data() -> Path:
    return REAL_DATA


@pytest.fixture(scope="session")
def smol_tokenizer():
    from curate import models

    return models.load_tokenizer(models.resolve(None))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer and chat template, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return str(folder)
