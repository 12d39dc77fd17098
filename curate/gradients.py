"""Per-example, per-module gradient norms in one batched forward/backward.

For a linear layer y = x Wᵀ the gradient of example i's loss is ∇W ℓ_i = G_iᵀ A_i, where A_i (T×d_in)
are the layer's inputs and G_i (T×d_out) the loss gradients at its outputs over i's tokens. We never form
the batch's weight gradient: parameters are frozen and autograd only flows through activations. A hook
captures A when the layer runs forward and, as soon as G arrives in backward, reduces the pair to
‖G_iᵀA_i‖²_F for every example and drops A. Two exact ways to get that number, chosen per layer by cost:
  - product: form G_iᵀA_i (d_out×d_in) and square-sum it        ~ T·d_in·d_out multiply-adds
  - Gram:    Σ_ts (A_iA_iᵀ)_ts (G_iG_iᵀ)_ts                      ~ T²·(d_in+d_out)
Examples in a batch do not interact (causal attention, right padding, no batch statistics), so backward
of Σ_i ℓ_i gives each example its own G_i. With right padding a padded position feeds only later padded
positions and no loss, so its G is exactly zero and it adds exactly nothing to either form. That lets A
be a view of the layer input rather than a masked copy: q, k and v (and gate and up) share one input
tensor, so the probe holds each activation once, as a training step does."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The projection matrices PRISM measures, in their order within a decoder layer (Llama/Qwen/Mistral names).
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"\.(\d+)\.")


def probed_modules(model: nn.Module, names: tuple[str, ...] = DEFAULT_MODULES) -> list[tuple[str, nn.Linear]]:
    """Linear layers whose last name component is in `names`, ordered by (layer index, position in
    `names`): for SmolLM2, q,k,v,o,gate,up,down of layer 0, then of layer 1, ..."""
    found = []
    for full, mod in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf in names and isinstance(mod, nn.Linear):
            layer = _LAYER.search(full)
            found.append(((int(layer.group(1)) if layer else -1, names.index(leaf)), full, mod))
    if not found:
        leaves = sorted({full.rsplit(".", 1)[-1] for full, mod in model.named_modules()
                         if isinstance(mod, nn.Linear) and _LAYER.search(full)})
        raise ValueError(f"no linear modules named {' '.join(names)} in {type(model).__name__}; its layers' "
                         f"linear modules are: {' '.join(leaves) or 'none'}. Choose among them with "
                         "--modules NAME ... (e.g. --modules qkv_proj o_proj gate_up_proj down_proj)")
    return [(full, mod) for _, full, mod in sorted(found, key=lambda x: x[0])]


def per_example_sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖G_iᵀA_i‖²_F for each i, a: (B,T,d_in), g: (B,T,d_out), in fp32, by the cheaper exact form."""
    a, g = a.float(), g.float()
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if t * (d_in + d_out) < d_in * d_out:
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(g.transpose(1, 2), a).square().sum(dim=(1, 2))


@dataclass
class ProbeResult:
    loss: torch.Tensor        # (B,) mean NLL over each example's loss tokens
    sq_norms: torch.Tensor    # (B, M) squared Frobenius norms, modules in probed_modules order


@contextmanager
def _capture(modules: list[tuple[str, nn.Linear]], out: torch.Tensor):
    """Hooks that write ‖∇W_m ℓ_i‖² into out[:, m] during backward."""
    handles = []

    def make_hook(m: int):
        def forward_hook(_mod, inputs, output):
            acts = inputs[0].detach()  # a view: no copy, shared by the layers that read this input
            version = inputs[0]._version

            def grad_hook(grad):
                nonlocal acts
                if acts._version != version:  # a view would silently see an in-place change
                    raise RuntimeError(f"{modules[m][0]}: its input was modified in place after forward")
                out[:, m] = per_example_sq_norm(acts, grad)
                acts = None  # free this layer's activations as soon as its norms exist

            output.register_hook(grad_hook)
        return forward_hook

    try:
        for m, (_, mod) in enumerate(modules):
            handles.append(mod.register_forward_hook(make_hook(m)))
        yield
    finally:
        for h in handles:
            h.remove()


# Config keys by which a model post-processes its head's output (Gemma-2/3's final softcap, Granite's
# logits_scaling, Cohere's logit_scale, Falcon-H1's lm_head_multiplier): such a model always takes the
# path through its own forward, even where the numeric check below cannot see the difference.
_HEAD_POSTPROCESSING = ("final_logit_softcapping", "logits_scaling", "logit_scale", "lm_head_multiplier")


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its output embedding applied to its decoder's last hidden
    state (Llama, Qwen, Mistral, ...). Checked once per model: no post-processing key in its config, and
    its own forward on a few tokens gives the same logits. Models that post-process (see
    _HEAD_POSTPROCESSING) or whose head is anything else take `target_logps`' own-forward path."""
    cached = getattr(model, "_curate_plain_head", None)
    if cached is not None:
        return cached
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    plain = not any(getattr(c, key, None) not in (None, 1, 1.0) for c in (config, text) for key in _HEAD_POSTPROCESSING)
    if plain:
        device = model.get_input_embeddings().weight.device
        ids = torch.arange(1, 9, device=device).unsqueeze(0) % model.get_input_embeddings().num_embeddings
        with torch.no_grad():
            own = model(input_ids=ids, use_cache=False).logits[0].float()
            hidden = _decoder(model)(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
            ours = model.get_output_embeddings()(hidden)[0].float()
        plain = own.shape == ours.shape and torch.allclose(own, ours, rtol=1e-5, atol=1e-6)
    model._curate_plain_head = plain
    return plain


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def target_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                 inputs_embeds: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """(row, log p) of every target token: positions where loss_mask is 1 (a token counts as a target).

    For a plain head (see plain_head) the LM head runs only on target positions: it is the largest matmul
    and most positions are context. Any other model is run through its own forward with `logits_to_keep`
    set to the target columns, so that every logit post-processing it defines is applied: exact, at the
    cost of logits (B × distinct target columns × vocabulary) instead of (targets × vocabulary)."""
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    rows, cols = loss_mask[:, 1:].bool().nonzero(as_tuple=True)
    if plain_head(model):
        hidden = _decoder(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[rows, cols])  # predicts token cols+1
    else:
        keep, where = torch.unique(cols, return_inverse=True)
        out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
        logits = out.logits[rows, where]
    return rows, -F.cross_entropy(logits.to(dtype), input_ids[rows, cols + 1], reduction="none")


def token_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              loss_mask: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean NLL over target positions (see target_logps)."""
    rows, logp = target_logps(model, input_ids, attention_mask, loss_mask, inputs_embeds)
    counts = loss_mask[:, 1:].sum(dim=1)
    per_example = torch.zeros(input_ids.shape[0], device=logp.device).index_add_(0, rows, -logp)
    return per_example / counts.clamp(min=1)


def probe_batch(model: nn.Module, modules: list[tuple[str, nn.Linear]], input_ids: torch.Tensor,
                attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                autocast_dtype: torch.dtype | None = None) -> ProbeResult:
    """Loss and per-module squared gradient norms for a right-padded batch (padding after each example's
    tokens: exactness relies on it); model parameters frozen."""
    sq = torch.zeros(input_ids.shape[0], len(modules), device=input_ids.device, dtype=torch.float32)
    plain_head(model)  # its one-time check runs a forward: not under the hooks below
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    with _capture(modules, sq), torch.autocast(
            input_ids.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = token_nll(model, input_ids, attention_mask, loss_mask, inputs_embeds=embeds)
        loss.sum().backward()  # Σ_i ℓ_i: each example's gradient is its own
    return ProbeResult(loss.detach(), sq)
