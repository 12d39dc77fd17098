"""The architecture map on the families users bring: every one either measured exactly by role (plain
autograd over the model's own forward, fused blocks and MoE experts included) or refused with a message
that says what to pass. Tiny random models (2 layers), seconds each."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from curate.roles import DENSE_ROLES, NotCovered, decoder, role_map
from curate.stages.configs import ProbeConfig
from tests.test_gradients import assert_matches_autograd, make_examples, probe

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
UNGATED = ("q", "k", "v", "o", "up", "down")
MOE = ("q", "k", "v", "o", "router", "expert_gate", "expert_up", "expert_down")
SHARED = ("shared_router", "shared_gate", "shared_up", "shared_down")
EXPERTS = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)

# family -> (model_type, config overrides, roles of every layer)
FAMILIES = {
    "llama": ("llama", {}, DENSE_ROLES),
    "qwen2": ("qwen2", {}, DENSE_ROLES),
    "qwen3": ("qwen3", {}, DENSE_ROLES),
    "mistral": ("mistral", {}, DENSE_ROLES),
    "gemma2": ("gemma2", {"head_dim": 16}, DENSE_ROLES),
    "gemma3_text": ("gemma3_text", {"head_dim": 16}, DENSE_ROLES),
    "phi3": ("phi3", {}, DENSE_ROLES),
    "gpt_neox": ("gpt_neox", {"num_key_value_heads": None}, UNGATED),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "num_attention_heads": None,
                      "num_key_value_heads": None, "hidden_size": None, "num_hidden_layers": None}, UNGATED),
    "falcon_new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, UNGATED),
    "falcon_multi_query": ("falcon", {"new_decoder_architecture": False, "multi_query": True}, UNGATED),
    "falcon_per_head": ("falcon", {"new_decoder_architecture": False, "multi_query": False}, UNGATED),
    "granite": ("granite", {}, DENSE_ROLES),
    "cohere": ("cohere", {}, DENSE_ROLES),
    "olmo2": ("olmo2", {}, DENSE_ROLES),
    "qwen3_moe": ("qwen3_moe", EXPERTS, MOE),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, MOE),
    "qwen2_moe": ("qwen2_moe", {**EXPERTS, "shared_expert_intermediate_size": 48}, MOE + SHARED),
    # beyond the matrix, the rest of the README's table
    "gemma": ("gemma", {"head_dim": 16}, DENSE_ROLES),
    "olmo3": ("olmo3", {}, DENSE_ROLES),
    "cohere2": ("cohere2", {}, DENSE_ROLES),
    "stablelm": ("stablelm", {}, DENSE_ROLES),
    "smollm3": ("smollm3", {}, DENSE_ROLES),
    "glm": ("glm", {}, DENSE_ROLES),
    "glm4": ("glm4", {}, DENSE_ROLES),
    "exaone4": ("exaone4", {}, DENSE_ROLES),
    "ernie4_5": ("ernie4_5", {}, DENSE_ROLES),
    "seed_oss": ("seed_oss", {}, DENSE_ROLES),
    "vaultgemma": ("vaultgemma", {"head_dim": 16}, DENSE_ROLES),
    "phi": ("phi", {}, UNGATED),
    "starcoder2": ("starcoder2", {}, UNGATED),
    "gpt_bigcode": ("gpt_bigcode", {}, UNGATED),
    "gpt_bigcode_mha": ("gpt_bigcode", {"multi_query": False, "num_key_value_heads": None}, UNGATED),
    "phimoe": ("phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2}, MOE),  # its router: a Linear subclass
    "bloom": ("bloom", {"num_key_value_heads": None}, UNGATED),
    "persimmon": ("persimmon", {"num_key_value_heads": None}, UNGATED),
    "olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}, MOE),
    "granitemoe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2}, MOE),
}


def build(family: str):
    model_type, overrides, _ = FAMILIES[family]
    kwargs = {k: v for k, v in {**COMMON, **overrides}.items() if v is not None}
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def gemma3_multimodal():
    torch.manual_seed(0)
    text = {k: v for k, v in COMMON.items() if k != "pad_token_id"} | {"head_dim": 16}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=255, boi_token_index=254, eoi_token_index=253)
    return transformers.Gemma3ForConditionalGeneration(config).eval().requires_grad_(False)


def layer_roles(rmap) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}
    for e in rmap.entries:
        out.setdefault(e.layer, []).append(e.role)
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_exact_by_role(family):
    model = build(family)
    rmap = role_map(model)
    assert layer_roles(rmap) == {0: FAMILIES[family][2], 1: FAMILIES[family][2]}
    assert_matches_autograd(model, make_examples(4))


def test_gemma3_multimodal_probes_its_language_model_only():
    model = gemma3_multimodal()
    rmap = role_map(model)
    assert layer_roles(rmap) == {0: DENSE_ROLES, 1: DENSE_ROLES}
    assert all(".language_model." in name for name in rmap.names)  # no vision tower entry
    examples = [([t % 250 for t in ids], mask) for ids, mask in make_examples(3)]  # no image tokens
    assert_matches_autograd(model, examples, rmap)


def _site_rows(rmap, layer: int, role: str):
    for site in rmap.sites:
        for col, rows in site.blocks:
            e = rmap.entries[col]
            if e.layer == layer and e.role == role:
                return site, rows
    raise KeyError(role)


def _scale_outputs(site, rows, factor: float) -> None:
    """Multiply the weight rows (Conv1D: columns; expert stack: per expert) computing `rows`, and their bias."""
    from transformers.pytorch_utils import Conv1D

    rows = slice(None) if rows is None else rows
    w = site.param
    if w.ndim == 3:
        w[:, rows, :] *= factor
    elif isinstance(site.module, Conv1D):
        w[:, rows] *= factor
    else:
        w[rows, :] *= factor
    bias = getattr(site.module, "bias", None) if site.kind == "linear" else None
    if bias is not None:
        bias[rows] *= factor


def _scale_inputs(site, factor: float) -> None:
    site.param.mul_(factor)  # every input column: o reads all heads' values, down all of the MLP's units


def _logits(model):
    ids = torch.tensor([make_examples(1, seed=5)[0][0]])
    return model(input_ids=ids % 250).logits


@pytest.mark.parametrize("family", ["phi3", "glm", "glm4", "gpt_neox", "gpt2", "gpt_bigcode", "gpt_bigcode_mha",
                                    "bloom", "persimmon", "falcon_new", "falcon_multi_query", "falcon_per_head",
                                    "qwen3_moe", "llama"])
def test_the_blocks_are_the_roles_they_are_named(family):
    """Semantics, independent of any layout written down: q·k is unchanged when the q block is scaled by c
    and the k block by 1/c, the attention output when v is scaled by c and o by 1/c, a gated MLP when up
    is scaled by c and down by 1/c. A mislabelled block (a head of k counted as q) breaks the invariance;
    scaling q alone changes the logits, so the check is not vacuous."""
    model = build(family)
    up, down = ("expert_up", "expert_down") if family == "qwen3_moe" else ("up", "down")
    gated = "gate" in " ".join(FAMILIES[family][2])
    qk_norm = any(name.endswith(("q_norm", "q_layernorm")) for name, _ in model.named_modules())  # scales of q cancel there
    post_norm = any(name.endswith("post_mlp_layernorm") for name, _ in model.named_modules())  # GLM-4: of v, up
    before = _logits(model)
    with torch.no_grad():
        for pairs, compensate in (([("q", 3.0), ("k", 1 / 3.0)], None), ([("v", 3.0)], "o"),
                                  ([(up, 3.0)], down) if gated else ([], None)):
            if not pairs or pairs[0][0] == "q" and qk_norm:  # a norm on q and k (eps aside) hides their scale
                continue
            trial = copy.deepcopy(model)
            trial_map = role_map(trial)
            for layer in (0, 1):
                for role, factor in pairs:
                    _scale_outputs(*_site_rows(trial_map, layer, role), factor)
                if compensate:
                    _scale_inputs(_site_rows(trial_map, layer, compensate)[0], 1 / 3.0)
            torch.testing.assert_close(_logits(trial), before, rtol=1e-4, atol=1e-4)
            if pairs[0][0] != "q" and post_norm:
                continue
            alone = copy.deepcopy(model)
            _scale_outputs(*_site_rows(role_map(alone), 0, pairs[0][0]), 30.0)  # random scores are small
            assert not torch.allclose(_logits(alone), before, rtol=1e-3, atol=1e-3)


def test_an_unmapped_layout_is_refused_with_the_matrices_and_the_options():
    config = transformers.DeepseekV3Config(  # multi-head latent attention: no q, k, v matrices to name
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval().requires_grad_(False)
    with pytest.raises(NotCovered) as e:
        role_map(model)
    message = str(e.value)
    assert "not placed by any role: q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj (e.g. model.layers.0.self_attn" \
        ".q_a_proj.weight)" in message and "layer 0 yields roles o gate up down" in message
    assert "--modules" in message and "--allow-partial" in message
    partial = role_map(model, allow_partial=True)
    assert layer_roles(partial) == {0: ("o", "gate", "up", "down"), 1: (
        "o", "router", "expert_gate", "expert_up", "expert_down", "shared_gate", "shared_up", "shared_down")}
    assert partial.describe()["partial"] and len(partial.describe()["unprobed"]) == 8
    assert_matches_autograd(model, make_examples(2), partial)
    # the names the message gives, probed whole: kv_b_proj reads (B, 1, T, d), rows still per example
    named = role_map(model, ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))
    assert len(named.entries) == 10
    assert_matches_autograd(model, make_examples(2), named)


def test_modules_choose_roles_or_names():
    model = build("phi3")
    assert role_map(model, ("q", "o")).names == [
        "model.layers.0.self_attn.qkv_proj[q]", "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.qkv_proj[q]", "model.layers.1.self_attn.o_proj"]
    assert [e.role for e in role_map(model, ("gate_up_proj",)).entries] == ["gate", "up", "gate", "up"]
    assert role_map(model, ("q", "o")).describe()["unprobed"][:2] == [
        "model.layers.0.self_attn.qkv_proj[k]", "model.layers.0.self_attn.qkv_proj[v]"]
    with pytest.raises(ValueError, match="roles found: q k v o gate up down; module names: .*qkv_proj"):
        role_map(model, ("w_in",))
    mixtral = build("mixtral")  # a role name is only a role: `gate` is not Mixtral's router module `gate`
    with pytest.raises(ValueError, match="--modules gate: no role"):
        role_map(mixtral, ("gate",))
    assert {e.role for e in role_map(mixtral, ("router",)).entries} == {"router"}
    with pytest.raises(ValueError, match="--allow-partial with --modules"):
        ProbeConfig(modules=("q",), allow_partial=True)


def test_a_weight_whose_gradient_never_arrives_is_an_error():
    model = build("llama")
    rmap = role_map(model)
    model.model.layers[1].forward = lambda hidden_states, *a, **k: hidden_states  # layer 1 never runs
    with pytest.raises(RuntimeError, match="never saw the gradient of model.layers.1.self_attn.q_proj"):
        probe(model, make_examples(2), rmap)


def test_a_weight_applied_twice_is_an_error():
    model = build("llama")
    mlp = model.model.layers[0].mlp
    once = mlp.forward
    mlp.forward = lambda x: once(once(x))  # gate, up and down each applied twice in one forward
    with pytest.raises(RuntimeError, match="applied twice"):
        probe(model, make_examples(2))


def test_a_weight_shared_by_layers_is_refused_up_front_whatever_the_options():
    model = build("llama")
    model.model.layers[1].self_attn.q_proj.weight = model.model.layers[0].self_attn.q_proj.weight
    for options in ({}, {"allow_partial": True}, {"modules": ("q",)}):
        with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.weight and model.layers.1.self_attn.q_proj"
                                             ".weight are one shared weight"):
            role_map(model, **options)
    assert len(role_map(model, ("k", "v")).entries) == 4  # left out, the rest is measured


def test_a_fused_matrix_of_unknown_layout_is_never_split():
    """CodeGen's qkv_proj is [q | v | k] per model-parallel group: no layout is trusted unless read from
    the family's code, so it is refused, left out under --allow-partial, and probed whole when named."""
    config = transformers.CodeGenConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)
    torch.manual_seed(0)
    model = transformers.CodeGenForCausalLM(config).eval().requires_grad_(False)
    with pytest.raises(NotCovered, match="transformer.h.0.attn.qkv_proj.weight"):
        role_map(model)
    assert "q" not in layer_roles(role_map(model, allow_partial=True))[0]
    whole = role_map(model, ("qkv_proj",))
    assert [e.role for e in whole.entries] == ["qkv_proj", "qkv_proj"] and whole.sites[0].blocks[0][1] is None
    assert_matches_autograd(model, make_examples(2), whole)


def test_experts_applied_by_batched_matmul_are_refused_up_front():
    config = transformers.AutoConfig.for_model("llama4_text", **{**COMMON, "num_local_experts": 4, "head_dim": 16,
                                                                  "num_experts_per_tok": 1, "intermediate_size_mlp": 128})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(NotCovered, match="model.layers.0.feed_forward.experts.gate_up_proj"):
        role_map(model)


def test_expert_down_alone_follows_each_experts_tokens():
    model = build("qwen3_moe")
    assert_matches_autograd(model, make_examples(3), role_map(model, ("expert_down",)))


def test_the_manifest_record_says_model_class_roles_and_moe_convention():
    record = role_map(build("qwen2_moe")).describe()
    assert record["model_class"] == "Qwen2MoeForCausalLM" and not record["partial"]
    assert record["roles"][:8] == list(MOE) and "sqrt(Σ_e" in record["moe_convention"]
    assert record["layers"][0]["roles"]["expert_gate"] == "model.layers.0.mlp.experts.gate_up_proj[expert_gate]"
    assert "moe_convention" not in role_map(build("llama")).describe()


def test_prism_refuses_an_uncovered_model_before_any_work_and_records_allow_partial(smol_tokenizer, tmp_path, capsys):
    from curate.cli import main
    from tests.test_integrity_folders import DEMO, prism_args

    config = transformers.DeepseekV3Config(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    folder = tmp_path / "deepseek"
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("\n".join(DEMO.read_text().splitlines()[:6]) + "\n")
    out = tmp_path / "o"
    assert main(prism_args(corpus, out, str(folder))) == 2
    err = capsys.readouterr().err
    assert "kv_b_proj" in err and "--allow-partial" in err
    assert not out.exists()  # refused before any folder is touched
    assert main(prism_args(corpus, out, str(folder), "--allow-partial")) == 0
    record = json.loads((out / "manifest.json").read_text())["probe_map"]
    assert record["partial"] and len(record["unprobed"]) == 8 and record["model_class"] == "DeepseekV3ForCausalLM"
    assert "left out: model.layers.0.self_attn.q_a_proj.weight" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "falcon_per_head", "qwen2_moe", "mixtral"])
def test_numel_of_the_entries_adds_up_to_the_layers_matrices(family):
    """--module-scale numel divides by these: every weight of every layer's matrices is counted once,
    and an unfused entry counts exactly its own matrix."""
    model = build(family)
    rmap = role_map(model)
    numel = rmap.numel()
    layers = {n: p for n, p in decoder(model).named_parameters() if ".layers." in f".{n}" or ".h." in f".{n}"}
    matrices = {n: p for n, p in layers.items() if p.ndim >= 2 and "norm" not in n and "ln_" not in n}
    assert sum(numel) == sum(p.numel() for p in matrices.values())
    params = dict(model.named_parameters())
    for entry, n in zip(rmap.entries, numel):
        if "[" not in entry.name and f"{entry.name}.weight" in params:   # a whole module's own matrix
            assert n == params[f"{entry.name}.weight"].numel(), entry.name
