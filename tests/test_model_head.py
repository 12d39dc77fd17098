"""The probe's loss goes through the model's own logit path: families that post-process their head's
output (Gemma-2's final softcap, Granite's logits_scaling, Cohere's logit_scale) give the loss and norms
of plain autograd over the model's own forward, with head weights in a trained range (logits of tens,
where a softcap or a scale changes the loss by several nats)."""

from __future__ import annotations

import pytest
import torch
import transformers

from curate.gradients import plain_head
from curate.roles import role_map
from tests.test_gradients import assert_matches_autograd, make_examples, naive_norms, probe

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, True),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"head_dim": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}, False),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                 "attention_multiplier": 0.015625}, False),
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 0.0625}, False),
}


def build(family: str):
    config_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # trained-range logits
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_and_norms_follow_the_models_own_head(family):
    model = build(family)
    assert plain_head(model) is FAMILIES[family][3]
    assert_matches_autograd(model, make_examples(4))


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
def test_the_head_alone_would_be_wrong_for_these_families(family):
    """What the probe computed before it took the model's own head: the check above is not vacuous."""
    model = build(family)
    model._curate_plain_head = True  # force the head-only path
    examples = make_examples(4)
    loss, _ = probe(model, examples)
    ref_loss, _ = naive_norms(model, *examples[0])
    assert abs(loss[0].item() - ref_loss) > 0.05 * abs(ref_loss)


def test_a_module_name_the_model_lacks_is_refused_with_the_names_it_has():
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, pad_token_id=0))
    with pytest.raises(ValueError) as e:
        role_map(model, ("q_proj",))
    assert "--modules" in str(e.value) and "qkv_proj" in str(e.value) and "gate_up_proj" in str(e.value)


def _falcon_h1(embedding_multiplier: float):
    torch.manual_seed(0)
    config = transformers.FalconH1Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, mamba_d_ssm=64, mamba_n_heads=8,
        mamba_d_head=8, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16,
        embedding_multiplier=embedding_multiplier)
    return transformers.FalconH1ForCausalLM(config).eval().requires_grad_(False)


def test_a_model_whose_ids_and_embeddings_lead_apart_is_refused():
    """Falcon-H1 scales its embeddings only when it is given token ids; the probe starts from embeddings and
    would measure another function (norms off by up to 7× at a multiplier of 5), so it refuses."""
    model = _falcon_h1(5.0)
    with pytest.raises(RuntimeError, match="differs from its forward from their input embeddings"):
        plain_head(model)
    plain_head(_falcon_h1(1.0))  # the same family without the difference: no error
