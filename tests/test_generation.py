"""The generation engine with a tiny random Llama: seeded, batch-invariant, left padding right."""

import importlib.util

import pytest
import torch

from curate.stages.base import config_key
from curate import chat, generation, models
from curate.generation import GenerationConfig, RowSampler, generate, nucleus

CONVS = [[{"role": "user", "content": "What is 2 + 2?"}],
         [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "A much longer question about ducks, eggs and the farmers' market, please."}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Incorrect. Please think again."}]]


def cfg(model_dir, **kw):
    return GenerationConfig(**{"model": model_dir, "max_new_tokens": 8, "device": "cpu", **kw})


def test_nucleus_keeps_the_smallest_top_set():
    p = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert nucleus(p, 0.7).tolist() == pytest.approx([0.0, 0.5, 0.0, 0.25])
    assert nucleus(p, 0.75).tolist() == pytest.approx([0.0, 0.5, 0.0, 0.25])
    assert nucleus(p, 0.76).tolist() == pytest.approx([0.0, 0.5, 0.15, 0.25])
    assert nucleus(p, 0.01).tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])
    assert torch.equal(nucleus(p, 1.0), p)


def test_row_sampler_is_one_hot_and_seeded():
    scores = torch.randn(3, 50)
    out = RowSampler([1, 2, 3], 1.0, 0.9)(None, scores)
    assert ((out == 0).sum(1) == 1).all() and torch.isinf(out).sum() == 3 * 49
    again = RowSampler([1, 2, 3], 1.0, 0.9)(None, scores)
    assert torch.equal(out, again)
    # a row's choice does not depend on the other rows
    alone = RowSampler([2], 1.0, 0.9)(None, scores[1:2])
    assert torch.equal(alone[0], out[1])


@pytest.mark.parametrize("temperature, top_p, expected", [(1.0, 1.0, [0.1, 0.0, 0.6, 0.3]),
                                                          (1.0, 0.8, [0.0, 0.0, 0.6 / 0.9, 0.3 / 0.9]),
                                                          (0.5, 1.0, [0.01 / 0.46, 0.0, 0.36 / 0.46, 0.09 / 0.46])])
def test_row_sampler_draws_from_the_tempered_nucleus(temperature, top_p, expected):
    scores = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]])).repeat(3000, 1)
    picks = RowSampler(list(range(3000)), temperature, top_p)(None, scores).argmax(1)
    freq = torch.bincount(picks, minlength=4).double() / 3000
    assert freq.tolist() == pytest.approx(expected, abs=0.03)


def test_reruns_are_identical_and_samples_differ(tiny_model_dir):
    c = cfg(tiny_model_dir)
    a = generate(CONVS, c, n=3)
    assert generate(CONVS, c, n=3) == a
    assert [len(x) for x in a] == [3, 3, 3] and len(set(a[0])) == 3
    assert generate(CONVS, cfg(tiny_model_dir, seed=1), n=3) != a


def test_batch_mates_and_token_budget_do_not_change_a_row(tiny_model_dir):
    c = cfg(tiny_model_dir)
    seeds = [11, 22, 33]
    together = generate(CONVS, c, seeds=seeds)
    one_by_one = generate(CONVS, cfg(tiny_model_dir, batch_tokens=1), seeds=seeds)
    assert together == one_by_one
    assert generate(CONVS[1:2], c, seeds=[22]) == together[1:2]


def test_greedy_left_padded_batch_equals_unpadded_argmax(tiny_model_dir):
    """Temperature 0 is greedy; a left-padded batch gives each prompt the tokens it gets alone."""
    ref = models.resolve(tiny_model_dir)
    tok, model = models.load_tokenizer(ref), models.load_model(ref, "cpu")
    out = generate(CONVS, cfg(tiny_model_dir, temperature=0.0, max_new_tokens=6))
    for conv, (text,) in zip(CONVS, out):
        ids = tok(chat.render(tok, conv, generation_prompt=True), add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        new = []
        for _ in range(6):
            nxt = int(model(x).logits[0, -1].argmax())
            if nxt in generation._stop_ids(tok):
                break
            new.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        assert text == tok.decode(new, skip_special_tokens=True).strip()


def test_engine_choice_and_config_checks(tiny_model_dir):
    assert generation.resolve_engine(cfg(tiny_model_dir)) == "hf"  # no vllm, no CUDA here
    ident = config_key(cfg(tiny_model_dir))
    assert ident["engine"] == "hf" and "batch_tokens" not in ident and len(ident["model"]["sha256"]) == 64
    for bad in (dict(engine="tgi"), dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match="vllm"):
            generation.resolve_engine(cfg(tiny_model_dir, engine="vllm"))
