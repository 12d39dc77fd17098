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
tensor, so the probe holds each activation once, as a training step does.

What is measured comes from curate.roles: a weight, or a block of a fused one (its rows for a set of
outputs: the same forms on those columns of G). Inputs flattened to (B·T, d), as MoE blocks do, are
read back as (B, T, d); an expert sees only the tokens routed to it, which its owner gathered from the
flattened input, so its rows are regrouped by example (zero rows pad them, adding nothing)."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from curate import determinism
from curate.roles import RoleMap, Rows, Site, decoder

log = logging.getLogger(__name__)

# The probe's hooks go on the model object, which threads of one process share (a dask worker with several
# threads keeps one cached model): two probes at once would each see the other's forward. One at a time.
_PROBING = threading.RLock()


def per_example_sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖G_iᵀA_i‖²_F for each i, a: (B,T,d_in), g: (B,T,d_out), as fp32 (B,), by the cheaper exact form."""
    return per_example_block_sq_norms(a, g, [None])[:, 0]


LOW_PRECISION = (torch.bfloat16, torch.float16)

# FLOPs the device does in the time it moves one byte through memory (its "machine balance"), by device
# type and the matmuls' input precision: it weighs the bytes each form writes and reads against
# its multiply-adds. CUDA: an H100/H200 does ~790 TFLOP/s dense bf16 and ~4.3 TB/s device copies (measured),
# ~50 TFLOP/s plain fp32, ~400 with TF32 allowed. CPU: 0, i.e. multiply-adds alone, the rule curate has
# always used there. A fixed table, not a timing, so that the same inputs always take the same form.
MACHINE_BALANCE = {"cuda bf16/fp16": 180.0, "cuda fp32": 12.0, "cuda tf32": 90.0, "cpu": 0.0}


def _tf32_setting() -> tuple[object, str]:
    """(torch's CUDA matmul settings, the field that allows TF32): torch's newer fp32_precision, else
    the older allow_tf32."""
    matmul = torch.backends.cuda.matmul
    return matmul, "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matmuls may use TF32."""
    matmul, field = _tf32_setting()
    return getattr(matmul, field) in ("tf32", True)


@contextmanager
def tf32_matmuls(enabled: bool = True):
    """CUDA fp32 matmuls may use TF32 (10-bit mantissa inputs, fp32 accumulation) inside the block, and
    the setting is restored after it. The probe's `--dtype tf32`."""
    matmul, field = _tf32_setting()
    before = getattr(matmul, field)
    setattr(matmul, field, ("tf32" if enabled else "ieee") if field == "fp32_precision" else enabled)
    try:
        yield
    finally:
        setattr(matmul, field, before)


def _balance(device: torch.device, low: bool) -> float:
    if device.type != "cuda":
        return MACHINE_BALANCE["cpu"]
    return MACHINE_BALANCE["cuda bf16/fp16" if low else "cuda tf32" if tf32_enabled() else "cuda fp32"]


def gram_is_cheaper(t: int, d_in: int, d_out: int, blocks: int, balance: float) -> bool:
    """Whether the Gram form costs less than the product form for one example of T tokens (d_out: all
    blocks' outputs together; blocks: how many Grams of G are formed), by roofline cost = multiply-add
    FLOPs + balance · fp32 bytes written and read (see MACHINE_BALANCE):
      Gram:    2T²(d_in + d_out) FLOPs; A Aᵀ and each block's G Gᵀ, T×T each, written and read
      product: 2T·d_in·d_out FLOPs;   G ᵀA, d_out×d_in, written and read back to square it"""
    gram = 2 * t * t * (d_in + d_out) + balance * 8 * t * t * (1 + blocks)
    product = 2 * t * d_in * d_out + balance * 8 * d_in * d_out
    return gram < product


_OUT_DTYPE_BMM: dict[tuple, bool] = {}


def _out_dtype_bmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has bmm(..., out_dtype=float32) for `dtype` inputs on `device` (CUDA, torch 2.8+),
    tried once on a 1×1×1 product: a failure of the real call (out of memory, say) is never taken for
    a missing kernel."""
    key = (str(device), dtype)  # per device: a model split across unlike GPUs asks each
    if key not in _OUT_DTYPE_BMM:
        one = torch.ones(1, 1, 1, device=device, dtype=dtype)
        try:
            _OUT_DTYPE_BMM[key] = torch.bmm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError) as e:
            if determinism.is_determinism_error(e):  # strict mode refusing cuBLAS, not a missing kernel
                raise
            _OUT_DTYPE_BMM[key] = False
    return _OUT_DTYPE_BMM[key]


def _bmm_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y as fp32. bf16/fp16 inputs stay low precision (tensor cores) with fp32 accumulation and an fp32
    result (torch's bmm out_dtype). Where torch lacks it, the inputs are upcast: the same exact products of
    the low-precision values, accumulated in fp32, only slower (a low-precision result would be rounded,
    and an fp16 Gram entry overflows past 65504)."""
    if x.dtype not in LOW_PRECISION:
        return torch.bmm(x, y)
    if _out_dtype_bmm(x.device, x.dtype):
        return torch.bmm(x, y, out_dtype=torch.float32)
    return torch.bmm(x.float(), y.float())


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (torch < 2.4, which cannot say per device: assumed on)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return True


def per_example_block_sq_norms(a: torch.Tensor, g: torch.Tensor, blocks: list[Rows],
                               form: str | None = None) -> torch.Tensor:
    """(B, len(blocks)) fp32: ‖G_i[:, b]ᵀ A_i‖²_F for each example i and each block b of output features (a
    slice or index of g's last dim; None: all), i.e. the gradient norm of the rows of W that compute those
    outputs; a: (B,T,d_in), g: (B,T,d_out). Both exact forms cost what one unsplit matrix does:
      Gram:    (A_iA_iᵀ) formed once, Σ_ts (A_iA_iᵀ)_ts (G_ibG_ibᵀ)_ts per block    ~ T²·(d_in+d_out)
      product: squares of G_iᵀA_i (d_out×d_in), summed over each block's rows          ~ T·d_in·d_out
    chosen per call by `gram_is_cheaper` for this device (`form` "gram" or "product" forces one: the
    benchmarks time both).

    Precision. On CUDA, a bf16/fp16 g (autocast: the output gradient a bf16 training step has too) makes
    both matmuls take bf16/fp16 inputs (a is cast to g's dtype, as autocast's linear did in forward), so
    they run on tensor cores, accumulating in fp32 with an fp32 result; squares and sums are fp32. That is
    the weight gradient a bf16 training step forms, so the norm matches it, not an fp32 one: relative
    error against fp32 inputs ~1e-3 (benchmarks/gpu_check.py measures it). Otherwise (fp32, or any CPU run)
    everything is fp32, and under TF32 (torch.backends.cuda.matmul.allow_tf32, the user's choice) CUDA
    fp32 matmuls use it (`tf32_matmuls`)."""
    if form not in (None, "gram", "product"):
        raise ValueError(f"form {form!r}: None (the cheaper), 'gram' or 'product'")
    low = a.device.type == "cuda" and g.dtype in LOW_PRECISION
    a, g = (a.to(g.dtype), g) if low else (a.float(), g.float())
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    gram = form == "gram" if form else gram_is_cheaper(t, d_in, d_out, len(blocks), _balance(a.device, low))
    # a caller's autocast would lower these matmuls' precision again (checked first: entering the context
    # costs more Python than a small module's whole norm step)
    with torch.autocast(a.device.type, enabled=False) if _autocast_on(a.device.type) else nullcontext():
        if gram:
            aa = _bmm_fp32(a, a.transpose(1, 2))
            grams = [g if b is None else g[..., b] for b in blocks]
            sums = [(aa * _bmm_fp32(gb, gb.transpose(1, 2))).sum(dim=(1, 2)) for gb in grams]
        else:
            squares = _bmm_fp32(g.transpose(1, 2), a).square()  # (B, d_out, d_in)
            sums = [(squares if b is None else squares[:, b]).sum(dim=(1, 2)) for b in blocks]
    return sums[0].unsqueeze(1) if len(sums) == 1 else torch.stack(sums, dim=1)


def _by_example(x: torch.Tensor, example: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of x (N, d) regrouped as (n, L, d) by the example each belongs to, zero-padded: zero rows add
    nothing to either form above."""
    order = torch.argsort(example, stable=True)
    counts = torch.bincount(example, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    ex = example[order]
    out = x.new_zeros(n, int(counts.max()) if len(example) else 0, x.shape[-1])
    out[ex, torch.arange(len(ex), device=x.device) - start[ex]] = x[order]
    return out


@dataclass
class ProbeResult:
    """What `probe_batch` returns for B examples and M = len(rmap.entries) entries (shapes beside the
    fields; the loss in nats per target token)."""

    loss: torch.Tensor        # (B,) mean NLL over each example's loss tokens
    sq_norms: torch.Tensor    # (B, M) squared Frobenius norms, entries in RoleMap order


class _Capture:
    """Writes Σ ‖∇W ℓ_i‖² of every entry into sq[:, entry] during one batch's backward, and checks that
    every entry was reached and no weight was applied twice (the norm of a sum is not a sum of norms)."""

    def __init__(self, rmap: RoleMap, sq: torch.Tensor, seq_len: int):
        self.rmap, self.sq, self.seq = rmap, sq, seq_len
        self.fired = [False] * len(rmap.entries)
        self.applied: set = set()
        # what each site's hooks need and never changes within a batch, worked out once rather than at every
        # application: its name for errors, its columns of sq (a slice where they are consecutive, always
        # for the role maps curate builds: indexing with a list copies it to the GPU from host memory, which
        # waits for every queued kernel, once per module) and its blocks of output features
        self.layout = {id(site): self._layout(site) for site in rmap.sites}

    def _layout(self, site: Site) -> tuple[str, list[int], slice | list[int], list[Rows]]:
        cols = [c for c, _ in site.blocks]
        where = slice(cols[0], cols[-1] + 1) if cols == list(range(cols[0], cols[-1] + 1)) else cols
        return self.rmap.entries[cols[0]].name, cols, where, [rows for _, rows in site.blocks]

    def watch(self, site: Site, key, a: torch.Tensor, out: torch.Tensor, tokens: torch.Tensor | None = None):
        """One application of `site`'s weight (key: which one, e.g. an expert): a its input, out its output,
        tokens the flat index (example * T + position) of each row when a holds only some tokens."""
        b, t = self.sq.shape[0], self.seq
        name, cols, where, blocks = self.layout[id(site)]
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"{name}: its forward returns {type(out).__name__}, not the tensor of a linear map")
        if (id(site), key) in self.applied:
            raise RuntimeError(f"{name}{'' if key is None else f' (expert {key})'} is applied twice in one forward; "
                               "its per-example gradient would be a sum of two products, which the probe does not form")
        self.applied.add((id(site), key))
        if tokens is None and a.dim() == 2 and a.shape[0] == b * t:
            a = a.reshape(b, t, -1)  # flattened (B*T, d): MoE blocks' routers and shared experts
        elif tokens is None and a.dim() >= 3 and a.shape[0] == b and a.shape[:-1] == out.shape[:-1]:
            # (B, ..., d): every row of example i is under index i (DeepSeek's kv_b_proj sees (B, 1, T, d));
            # the per-example sum over rows does not depend on their order
            a = a.reshape(b, -1, a.shape[-1])
        elif tokens is None:
            raise RuntimeError(f"{name}: input of shape {tuple(a.shape)} is neither the batch's ({b}, ..., d) nor "
                               f"its {b * t} flattened tokens; the probe cannot tell which example each row is")
        a = a.detach()  # a view: no copy, shared by the layers that read this input
        version = a._version

        def grad_hook(grad):
            nonlocal a
            if a._version != version:  # a view would silently see an in-place change
                raise RuntimeError(f"{name}: its input was modified in place after forward")
            # Split models (accelerate's device_map): the norms are formed on the module's device, where its
            # output gradient is. A forward hook sees the input as the module was called with it, before
            # accelerate's own hook moved it there (a no-op inside a block whose input accelerate moved)
            a = a.to(grad.device)
            if tokens is None:
                norms = per_example_block_sq_norms(a, grad.reshape(b, a.shape[1], -1), blocks)
            else:
                ex = torch.div(tokens.to(grad.device), t, rounding_mode="floor")
                norms = per_example_block_sq_norms(_by_example(a, ex, b), _by_example(grad, ex, b), blocks)
            if isinstance(where, slice):
                self.sq[:, where].add_(norms.to(self.sq.device))  # in place on a view: no copy back
            else:
                self.sq[:, where] += norms.to(self.sq.device)
            for c in cols:
                self.fired[c] = True
            a = None  # free this layer's activations as soon as its norms exist

        out.register_hook(grad_hook)

    def check(self) -> None:
        """RuntimeError naming the entries whose gradient never arrived in this backward (the model did not
        apply those weights as the role map expects)."""
        missing = [e.name for e, fired in zip(self.rmap.entries, self.fired) if not fired]
        if missing:
            raise RuntimeError(f"the probe never saw the gradient of {', '.join(missing[:4])}"
                               f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}: the model did not "
                               "apply these weights as the architecture map expects (see curate.roles)")


class _Functional(TorchFunctionMode):
    """Active during the forward of a module that applies its weights by F.linear itself (a router's
    weight, an (experts, out, in) stack indexed per expert). It sees each F.linear on a watched weight or
    on one expert's slice of it, and which rows of the module's input were gathered for that expert."""

    def __init__(self, capture: _Capture, sites: list[Site], owner: nn.Module, module_input):
        super().__init__()
        self.capture, self.input = capture, module_input
        self.params = {id(s.param): s for s in sites}
        # every expert stack of the owner, watched or not: an expert's tokens are known from whichever of
        # its matrices reads the gathered rows first (down_proj alone may be probed)
        self.stacks = {id(p) for p in owner.parameters(recurse=False) if p.ndim == 3} | set(self.params)
        self.slices: dict[int, tuple] = {}     # id(expert slice) -> (slice, site or None, expert)
        self.gathered: dict[int, tuple] = {}   # id(gathered rows) -> (rows tensor, token index)
        self.tokens: dict[int, torch.Tensor] = {}  # expert -> token index of its gathered rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__:
            src, index = args[0], args[1]
            if id(src) in self.stacks and isinstance(index, (int, torch.Tensor)):
                self.slices[id(out)] = (out, self.params.get(id(src)), int(index))
            elif src is self.input and isinstance(index, torch.Tensor) and index.dim() == 1 \
                    and not index.dtype.is_floating_point and index.dtype != torch.bool:
                self.gathered[id(out)] = (out, index)
        elif func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if id(w) in self.params:
                site, expert = self.params[id(w)], None
            elif id(w) in self.slices:
                _, site, expert = self.slices[id(w)]
            else:
                return out
            if expert is not None and id(x) in self.gathered:
                self.tokens.setdefault(expert, self.gathered[id(x)][1])
            if site is None:
                return out
            tokens = self.tokens.get(expert) if expert is not None else None
            if expert is not None and tokens is None and x.shape[0] != self.capture.sq.shape[0] * self.capture.seq:
                raise RuntimeError(f"{self.capture.rmap.entries[site.blocks[0][0]].name}: expert {expert}'s "
                                   "input rows cannot be traced to the batch's tokens")
            self.capture.watch(site, expert, x, out, tokens)
        return out


@contextmanager
def _capture(rmap: RoleMap, sq: torch.Tensor, seq_len: int):
    """Hooks for every site of the role map; raises after backward if an entry's gradient never came."""
    cap = _Capture(rmap, sq, seq_len)
    handles, by_owner = [], {}
    for site in rmap.sites:
        if site.kind == "linear":
            handles.append(site.module.register_forward_hook(
                lambda mod, inputs, output, site=site: cap.watch(site, None, inputs[0], output)))
        else:
            by_owner.setdefault(id(site.module), (site.module, []))[1].append(site)
    for owner, sites in by_owner.values():
        active: list[_Functional] = []

        def enter(mod, args, sites=sites, active=active):
            active.append(_Functional(cap, sites, mod, args[0]))
            active[-1].__enter__()

        def leave(_mod, _args, _output, active=active):
            active.pop().__exit__(None, None, None)

        handles += [owner.register_forward_pre_hook(enter), owner.register_forward_hook(leave, always_call=True)]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eager_experts(model: nn.Module, rmap: RoleMap):
    """Expert stacks are watched through F.linear per expert: transformers' eager experts forward, not its
    grouped-matmul kernels, for the probe's duration."""
    stacks = any(s.kind == "functional" and s.param.ndim == 3 for s in rmap.sites)
    get = getattr(model, "get_experts_implementation", None)
    before = get() if stacks and get is not None else {}
    switch = any(v not in (None, "eager") for v in before.values())
    if switch:
        model.set_experts_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_experts_implementation(before)


# Config keys by which a model post-processes its head's output (Gemma-2/3's final softcap, Granite's
# logits_scaling, Cohere's logit_scale, Falcon-H1's lm_head_multiplier): such a model always takes the
# path through its own forward, even where the numeric check below cannot see the difference.
_HEAD_POSTPROCESSING = ("final_logit_softcapping", "logits_scaling", "logit_scale", "lm_head_multiplier")


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its output embedding applied to its decoder's last hidden
    state (Llama, Qwen, Mistral, ...). Checked once per model: no post-processing key in its config, and
    its own forward on a few tokens gives the same logits. Models that post-process (see
    _HEAD_POSTPROCESSING) or whose head is anything else take `target_logps`' own-forward path. RuntimeError
    for a model whose forward from token ids differs from its forward from their embeddings, where every
    path of target_logps starts."""
    cached = getattr(model, "_curate_plain_head", None)
    if cached is not None:
        return cached
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    plain = not any(getattr(c, key, None) not in (None, 1, 1.0) for c in (config, text) for key in _HEAD_POSTPROCESSING)
    plain = plain and decoder(model) is not model  # no separate decoder to run: the model's own forward
    embed = model.get_input_embeddings()
    ids = torch.arange(1, 9, device=embed.weight.device).unsqueeze(0) % embed.num_embeddings
    with torch.no_grad():
        own = model(input_ids=ids, use_cache=False).logits[0].float()
        if plain:
            hidden = decoder(model)(inputs_embeds=embed(ids), use_cache=False).last_hidden_state
            ours = model.get_output_embeddings()(hidden)[0].float().to(own.device)  # head on another GPU
            plain = own.shape == ours.shape and torch.allclose(own, ours, rtol=1e-5, atol=1e-6)
        if not plain:  # the probe's forward starts from embeddings: they must lead where the ids do
            ours = model(inputs_embeds=embed(ids), use_cache=False).logits[0].float().to(own.device)
            if own.shape != ours.shape or not torch.allclose(own, ours, rtol=1e-5, atol=1e-6):
                raise RuntimeError(
                    f"{type(model).__name__}: its forward from token ids differs from its forward from their input "
                    "embeddings: it computes something from the ids that the embeddings skip (as Falcon-H1's "
                    "embedding_multiplier does). The probe starts from the embeddings, so it would measure another "
                    "function than the model; it cannot probe this model")
    model._curate_plain_head = plain
    return plain


def target_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                 inputs_embeds: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """(row, log p) of every target token: positions where loss_mask is 1 (a token counts as a target).

    For a plain head (see plain_head) the LM head runs only on target positions: it is the largest matmul
    and most positions are context. Any other model is run through its own forward with `logits_to_keep`
    set to the target columns, so that every logit post-processing it defines is applied: exact, at the
    cost of logits (B × distinct target columns × vocabulary) instead of (targets × vocabulary).

    Both are returned on loss_mask's device. A model split across GPUs (accelerate's device_map) has its
    last hidden states and logits on its last layers' or head's GPU: each index goes to the tensor it
    indexes, and the targets to the logits."""
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    rows, cols = loss_mask[:, 1:].bool().nonzero(as_tuple=True)
    if plain_head(model):
        # no KV cache: it would copy every layer's keys and values for nothing
        hidden = decoder(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state
        at = hidden.device
        logits = model.get_output_embeddings()(hidden[rows.to(at), cols.to(at)])  # predicts token cols+1
    else:
        keep, where = torch.unique(cols, return_inverse=True)
        # positions as a list: accelerate's hook on a split model would move a tensor to its first GPU, not to
        # the last hidden states' GPU where the model slices them
        out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_to_keep=keep.tolist(),
                    use_cache=False)
        at = out.logits.device
        logits = out.logits[rows.to(at), where.to(at)]
    targets = input_ids[rows.to(input_ids.device), cols.to(input_ids.device) + 1].to(logits.device)
    return rows, -F.cross_entropy(logits.to(dtype), targets, reduction="none").to(rows.device)


def token_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              loss_mask: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean NLL over target positions (see target_logps)."""
    rows, logp = target_logps(model, input_ids, attention_mask, loss_mask, inputs_embeds)
    targets = loss_mask[:, 1:].bool()
    counts = targets.sum(dim=1)
    # laid out (B, T-1) and summed per row, not index_add_: CUDA's index_add_ adds with atomics, in no
    # fixed order, so the loss would change in its last bits from run to run (target_logps' order is
    # row-major, as boolean indexing assigns)
    nll = torch.zeros(targets.shape, device=logp.device, dtype=logp.dtype)
    nll[targets.to(logp.device)] = -logp
    return nll.sum(dim=1) / counts.to(logp.device).clamp(min=1)


def probe_batch(model: nn.Module, rmap: RoleMap, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                autocast_dtype: torch.dtype | None = None) -> ProbeResult:
    """Loss and per-entry squared gradient norms (B, len(rmap.entries)) for a right-padded batch (padding
    after each example's tokens: exactness relies on it); model parameters frozen. RuntimeError when a
    probed weight's gradient never arrives or a weight is applied twice, and, from checks run once per model,
    when its forward from ids differs from its forward from embeddings (plain_head) or the hooks would mix
    examples' rows (_check_rows_are_examples).

    The model may be split across devices by accelerate (curate.models.load_model on several GPUs): each
    norm is formed on its layer's device and gathered on the inputs' device, as are the losses. Offloaded
    weights (accelerate's CPU or disk offload) work for the linear layers watched by module hooks, not for
    routers or expert stacks (RuntimeError: the probe finds those by their parameter objects).

    On CUDA each batch runs under torch's strict deterministic algorithms (curate.determinism), so the same
    inputs give the same bytes; a model with an op that has no deterministic kernel is probed in warn-only
    mode from its first such batch on, after one warning. Probes in several threads of a process run one at
    a time."""
    offloaded = [rmap.entries[s.blocks[0][0]].name for s in rmap.sites if s.kind == "functional" and (
        s.param.device.type == "meta" or all(p is not s.param for p in s.module.parameters()))]
    if offloaded:
        more = f" and {len(offloaded) - 4} more" if len(offloaded) > 4 else ""
        raise RuntimeError(f"{', '.join(offloaded[:4])}{more}: offloaded to CPU or disk by accelerate, or replaced "
                           "since the role map was built; the probe finds a router's or expert stack's weight by its "
                           "parameter object, which offloading swaps at every forward. Keep the model's weights on "
                           "its GPUs (curate.models.load_model never offloads) and build the role map after "
                           "dispatching it")
    with _PROBING:
        plain_head(model)  # its one-time check runs a forward: not under the hooks below
        _check_rows_are_examples(model, rmap, input_ids.device)
        return _probe_deterministic_first(model, rmap, input_ids, attention_mask, loss_mask, autocast_dtype)


def _check_rows_are_examples(model: nn.Module, rmap: RoleMap, device: torch.device) -> None:
    """Once per model and set of entries: two identical examples in one batch must get identical norms. The
    hooks tell which example a row of a layer's input belongs to from its shape alone, (B, T, d) or (B·T, d) batch-major; a
    layer that runs sequence-first ((T, B, d), or flattened from it) would mix examples without an error
    whenever B == T, or always once flattened. Here B = 2 and T = 3: a (T, B, d) input is refused by shape,
    and rows read in the wrong order pair one example's tokens with the other's. RuntimeError naming the
    entries that differ."""
    checked = getattr(model, "_curate_rows_checked", None)
    if checked is None:
        checked = model._curate_rows_checked = set()
    if tuple(rmap.names) in checked:
        return
    ids = (torch.arange(1, 4, device=device) % model.get_input_embeddings().num_embeddings).repeat(2, 1)
    ones = torch.ones_like(ids)
    res = _probe_deterministic_first(model, rmap, ids, ones, ones, None)
    first, second = res.sq_norms.double()
    scale = float(first.abs().max())
    differ = ~torch.isclose(first, second, rtol=1e-4, atol=1e-9 * scale)
    if differ.any() or not torch.isclose(res.loss[0], res.loss[1], rtol=1e-5):
        names = [name for name, bad in zip(rmap.names, differ.tolist()) if bad]
        raise RuntimeError(f"{type(model).__name__}: two identical examples in one batch got different gradient "
                           f"norms ({', '.join(names[:4]) or 'and losses'}{' ...' if len(names) > 4 else ''}): the "
                           "probe cannot tell which example each row of a layer's input belongs to (a layer that "
                           "runs sequence-first, say), so it cannot probe this model")
    checked.add(tuple(rmap.names))


def _probe_deterministic_first(*args) -> ProbeResult:
    """_probe under strict deterministic algorithms, or warn-only from a model's first refusal on."""
    model, input_ids = args[0], args[2]
    if getattr(model, "_curate_not_deterministic", None) is None:
        try:
            return _probe(*args, strict=True)
        except RuntimeError as e:
            if not determinism.is_determinism_error(e):
                raise
            model._curate_not_deterministic = determinism.reason(e)
        # after the except block, so that the failed attempt's graph is freed before the retry
        log.warning(f"{model._curate_not_deterministic}. So this model is probed on {input_ids.device.type} "
                    "without strict deterministic algorithms: its scores are reproducible to float rounding "
                    "(about 1e-6 relative), not bit for bit, and a row at the routing threshold can change route "
                    "between runs (see docs/gpus.md, Determinism on CUDA)")
    return _probe(*args, strict=False)


def _probe(model: nn.Module, rmap: RoleMap, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           loss_mask: torch.Tensor, autocast_dtype: torch.dtype | None, strict: bool) -> ProbeResult:
    """One probe_batch attempt, under strict (or warn-only) deterministic algorithms on CUDA."""
    sq = torch.zeros(input_ids.shape[0], len(rmap.entries), device=input_ids.device, dtype=torch.float32)
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    amp = torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.float32,
                         enabled=autocast_dtype is not None)
    capture = _capture(rmap, sq, input_ids.shape[1])
    with determinism.deterministic(input_ids.device, strict), _eager_experts(model, rmap), capture as cap:
        with amp:
            loss = token_nll(model, input_ids, attention_mask, loss_mask, inputs_embeds=embeds)
        # with autocast off (torch's advice; a caller's autocast too): each op's backward runs in its
        # forward's dtype regardless, an op the model runs in fp32 on purpose is not lowered in backward, and
        # the norm hooks need no autocast context of their own
        with torch.autocast(input_ids.device.type, enabled=False):
            loss.sum().backward()  # Σ_i ℓ_i: each example's gradient is its own
    cap.check()
    return ProbeResult(loss.detach(), sq)
