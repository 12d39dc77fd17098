"""The reference side of the probe's tests: an entry's norm read off the full weight gradient that plain
autograd left in `.grad`, with each family's fused layout written out here from its modeling code (not
taken from curate.roles, the code under test)."""

from __future__ import annotations

import torch


def reference_norm(model, name: str) -> float:
    """‖∇‖_F (float64) of the weight, or block of a fused weight, that grad_norms entry `name` measures."""
    path, _, role = name.partition("[")
    role = role.rstrip("]")
    mod_or_param = _lookup(model, path)
    grad = (mod_or_param.weight if isinstance(mod_or_param, torch.nn.Module) else mod_or_param).grad.double()
    if role:
        grad = _block(model, path, role, grad)
    return grad.norm().item()


def _lookup(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_parameter(path)


def _block(model, path: str, role: str, grad: torch.Tensor) -> torch.Tensor:
    cfg = model.config.get_text_config()
    leaf = path.rsplit(".", 1)[-1]
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if leaf == "gate_up_proj":  # [gate; up] along the output features (an expert stack: per expert)
        gate, up = grad.chunk(2, dim=-2)
        return {"gate": gate, "up": up}[role.removeprefix("expert_").removeprefix("shared_")]
    if leaf == "qkv_proj":  # Phi-3: q heads, then k heads, then v heads
        kv = cfg.num_key_value_heads
        q, k, v = grad.split([heads * head_dim, kv * head_dim, kv * head_dim], dim=0)
        return {"q": q, "k": k, "v": v}[role]
    if leaf == "c_attn" and cfg.model_type == "gpt_bigcode":
        if cfg.multi_query:  # [q heads | one k | one v]
            return dict(zip("qkv", grad.split([cfg.hidden_size, head_dim, head_dim], dim=0)))[role]
        return grad.view(heads, 3, head_dim, -1)[:, "qkv".index(role)]  # per head: q, k, v
    if leaf == "c_attn":  # GPT-2's Conv1D stores (in, out): q, k, v are column thirds
        return dict(zip("qkv", grad.split(cfg.hidden_size, dim=1)))[role]
    if leaf == "query_key_value" and cfg.model_type in ("gpt_neox", "bloom", "persimmon"):  # per head: q, k, v
        return grad.view(heads, 3, head_dim, -1)[:, "qkv".index(role)]
    if leaf == "query_key_value" and cfg.model_type == "falcon":
        if cfg.new_decoder_architecture:  # per kv group: its query heads, k, v
            per = heads // cfg.num_kv_heads
            g = grad.view(cfg.num_kv_heads, per + 2, head_dim, -1)
            return {"q": g[:, :per], "k": g[:, per], "v": g[:, per + 1]}[role]
        if cfg.multi_query:
            return dict(zip("qkv", grad.split([heads * head_dim, head_dim, head_dim], dim=0)))[role]
        return grad.view(heads, 3, head_dim, -1)[:, "qkv".index(role)]
    raise AssertionError(f"no reference layout for {path}[{role}]")
