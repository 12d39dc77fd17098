"""PRISM's roles for a decoder's weight matrices: the architecture map the probe measures by.

PRISM's vector holds, per decoder layer, the gradient norm of each projection by its role: q, k, v, o
(attention) and gate, up, down (MLP). Families name and pack these differently: Llama's q_proj..down_proj,
Phi-3's fused qkv_proj and gate_up_proj, GPT-NeoX's per-head interleaved query_key_value, Falcon's three
query_key_value layouts, GPT-2's Conv1D c_attn/c_fc/c_proj (weights stored transposed), MoE experts stored
as one (experts, out, in) tensor. The map finds every weight matrix of every decoder layer (only the
decoder: `get_decoder()`, so vision and audio towers are never probed) and gives each role its matrix or
its block of a fused matrix. A block is a set of the matrix's output features: its gradient norm is the
norm of the gradient's rows for those outputs (columns for Conv1D), exactly the role's own matrix had it
been stored alone.

Mixture-of-experts layers, by this convention (written into the manifest):
  router        ‖∇W_router‖_F                                   the (experts × hidden) router matrix
  expert_gate   ( Σ_e ‖∇W_gate,e‖²_F )^½ over routed experts e    likewise expert_up, expert_down
  shared_*      a shared expert (Qwen2-MoE) as an ordinary gated MLP; shared_router its sigmoid gate
Each example's expert gradients come from its own routing: an expert the example's tokens never reach has
zero gradient for it, and the routing weights are part of the chain rule.

A layer whose matrices the map cannot all place (a fused matrix of unknown layout, a state-space mixer,
...) is refused with the matrices listed, unless the run passes --allow-partial (recorded) or chooses
what to probe with --modules (roles or module names)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

DENSE_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
MOE_ROLES = ("router", "expert_gate", "expert_up", "expert_down",
             "shared_router", "shared_gate", "shared_up", "shared_down")
ROLE_ORDER = DENSE_ROLES + MOE_ROLES
MOE_CONVENTION = ("per MoE layer: router = ‖∇W_router‖_F; expert_gate/expert_up/expert_down = "
                  "sqrt(Σ_e ‖∇W_e‖²_F) over the routed experts e, each example through its own routing; "
                  "shared_gate/shared_up/shared_down/shared_router = the shared expert and its gate")

_ATTENTION = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
              "o_proj": "o", "out_proj": "o", "dense": "o", "c_proj": "o"}
_MLP = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "fc1": "up", "c_fc": "up",
        "dense_h_to_4h": "up", "down_proj": "down", "w2": "down", "fc2": "down", "c_proj": "down",
        "dense_4h_to_h": "down", "gate": "router", "router": "router"}
_EXPERT_STACKS = {"gate_up_proj": ("gate", "up"), "up_proj": ("up",), "down_proj": ("down",)}
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")

Rows = slice | torch.Tensor | None  # output features of a weight; None: all of them


class NotCovered(ValueError):
    """The architecture map cannot place every weight matrix of the decoder's layers."""


@dataclass
class Entry:
    """One column of grad_norms."""
    name: str    # module path (parameter path for expert stacks), "[role]" appended for a block
    role: str
    layer: int


@dataclass
class Site:
    """A weight the probe's hooks watch, and which entries its output blocks feed.

    kind "linear": an nn.Linear or Conv1D module; "functional": a parameter its owner module passes to
    F.linear itself (a router's weight, or one expert's slice of an (experts, out, in) stack)."""
    kind: str
    module: nn.Module          # the Linear/Conv1D, or the owner whose forward uses `param`
    param: nn.Parameter
    blocks: list[tuple[int, Rows]] = field(default_factory=list)  # (entry index, output features)


@dataclass
class RoleMap:
    """The architecture map of one model (`role_map`): its entries (the grad_norms columns, in order), the
    sites the probe's hooks watch and the layer matrices it leaves out (`unprobed`)."""

    entries: list[Entry]
    sites: list[Site]
    model_class: str
    unprobed: list[str]        # weight matrices (or blocks) of the decoder's layers no entry measures
    allow_partial: bool = False

    @property
    def names(self) -> list[str]:
        """Entry names in grad_norms order (the manifest's `modules`)."""
        return [e.name for e in self.entries]

    def describe(self) -> dict:
        """For the manifest: model class, role of each grad_norms entry, the map per layer, coverage."""
        layers: dict[int, dict[str, str]] = {}
        for e in self.entries:
            layers.setdefault(e.layer, {})[e.role] = e.name
        out = {"model_class": self.model_class, "roles": [e.role for e in self.entries],
               "layers": [{"layer": k, "roles": v} for k, v in sorted(layers.items())],
               "numel": self.numel(), "partial": bool(self.unprobed), "unprobed": self.unprobed}
        if any(e.role in MOE_ROLES for e in self.entries):
            out["moe_convention"] = MOE_CONVENTION
        return out

    def numel(self) -> list[int]:
        """Weights each grad_norms entry measures (d_out x d_in of its matrix or block, summed over the
        experts of a stack): what `--module-scale numel` divides each norm by the square root of."""
        from transformers.pytorch_utils import Conv1D

        counts = [0] * len(self.entries)
        for site in self.sites:
            shape = tuple(site.param.shape)
            axis = 1 if isinstance(site.module, Conv1D) and site.kind == "linear" or len(shape) == 3 else 0
            per_row = site.param.numel() // shape[axis]
            for index, rows in site.blocks:
                n = shape[axis] if rows is None else (len(range(*rows.indices(shape[axis]))) if isinstance(rows, slice)
                                                      else int(rows.numel()))
                counts[index] += n * per_row
        return counts

    def summary(self) -> str:
        """One line describing the map (`summary` of `describe()`)."""
        return summary(self.describe())


def summary(record: dict) -> str:
    """One line from a RoleMap.describe() record: the model class, then which roles which layers gave."""
    by_set: dict[tuple, list[int]] = {}
    for layer in record["layers"]:  # roles in PRISM's order (a manifest stores the keys sorted)
        by_set.setdefault(tuple(sorted(layer["roles"], key=_role_rank)), []).append(layer["layer"])
    parts = [f"layers {_spans(ls)}: {' '.join(roles)}" for roles, ls in by_set.items()]
    left = record.get("unprobed") or []
    left_out = f"; left out: {', '.join(left[:6])}{f' and {len(left) - 6} more' if len(left) > 6 else ''}" if left else ""
    return f"{record['model_class']}, {len(record['roles'])} entries; " + "; ".join(parts) + left_out


def decoder(model: nn.Module) -> nn.Module:
    """The text decoder: a multimodal model's language model, never its vision or audio tower. (Some
    causal-LM classes answer get_decoder() with themselves: then their base model.)"""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    if dec is model:  # Llama-4's text model names a base_model_prefix it does not have
        dec = getattr(model, "model", None) if isinstance(getattr(model, "model", None), nn.Module) else model.base_model
    return dec


def role_map(model: nn.Module, modules: tuple[str, ...] = (), allow_partial: bool = False) -> RoleMap:
    """The entries the probe measures, in grad_norms order (layer, then ROLE_ORDER).

    modules: () for every role the map finds, with the coverage check; otherwise PRISM role names and/or
    module names (the last component, e.g. `qkv_proj`, `query_key_value`), each of which must match.
    Raises NotCovered (a ValueError) naming the unplaced matrices and the options; ValueError for a
    `modules` item that matches nothing, or a probed weight that several modules share."""
    dec = decoder(model)
    prefix = next((n + "." for n, m in model.named_modules() if m is dec and n), "")
    model_type = getattr(getattr(dec, "config", None) or model.config, "model_type", "")
    found, unprobed = [], []   # found: (layer, role, name, site template)
    for pname, param in dec.named_parameters():
        layer = _LAYER.search(pname)
        if layer is None or param.ndim < 2 or pname.endswith("bias"):
            continue  # embeddings, final norm: not layer projections; norms and biases: not matrices
        owner_path, attr = pname.rsplit(".", 1)
        owner = dec.get_submodule(owner_path)
        if "norm" in type(owner).__name__.lower():
            continue  # a norm's scale, 2-D in some families (Cohere's per-head q/k norm): not a projection
        placed = _place(dec, owner_path, owner, attr, param, model_type)
        if placed is None:
            unprobed.append(prefix + pname)
            continue
        kind, name, blocks = placed
        site = Site(kind, owner, param)
        for role, rows in blocks:
            found.append((int(layer.group(1)), role, prefix + name + (f"[{role}]" if len(blocks) > 1 else ""),
                          site, rows))
    if modules:  # the user's choice: what it leaves out is recorded, not refused
        chosen = _select(found, modules, dec, prefix)
        names = {f[2] for f in chosen}
        unprobed = [f[2] for f in found if f[2] not in names] + unprobed
        found = chosen
    _refuse_shared(dec, prefix, {id(f[3].param) for f in found})
    if not modules and not allow_partial:
        _check_coverage(model, found, unprobed)
    if not found:
        raise NotCovered(f"{type(model).__name__}: no weight matrix of its decoder layers was found to probe")
    found.sort(key=lambda f: (f[0], _role_rank(f[1]), f[2]))
    entries, sites = [], {}
    for i, (layer, role, name, site, rows) in enumerate(found):
        entries.append(Entry(name, role, layer))
        sites.setdefault(id(site), site).blocks.append((i, rows))
    return RoleMap(entries, list(sites.values()), type(model).__name__, unprobed, allow_partial)


def _place(dec, owner_path: str, owner: nn.Module, attr: str, param: nn.Parameter, model_type: str):
    """(kind, name, [(role, rows)]) for one weight of a layer, or None when no role fits it."""
    from transformers.pytorch_utils import Conv1D

    parts = owner_path.split(".")
    leaf = parts[-1]
    if any("cross" in p for p in parts):
        return None  # cross-attention reads another stream (an image's); it is no role of the decoder's own
    shared = any(p.startswith("shared_expert") for p in parts)
    in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
    if isinstance(owner, (nn.Linear, Conv1D)) and attr == "weight":
        # a router that is a Linear with its own forward (Phi-MoE's, returning a tuple) is watched through
        # the F.linear it makes, like the routers below; other Linear subclasses (FalconLinear) by output
        plain = type(owner).forward in (nn.Linear.forward, Conv1D.forward)
        kind = "functional" if not plain and leaf in ("gate", "router") else "linear"
        out_features = param.shape[1] if isinstance(owner, Conv1D) else param.shape[0]
        if shared and leaf == "shared_expert_gate":
            return kind, owner_path, [("shared_router", None)]
        fused = _fused_layout(dec, owner_path, leaf, out_features, in_attention, model_type)
        if fused == []:
            return None  # a fused name whose layout is unknown here or does not add up: listed as unplaced
        if fused is not None:
            return kind, owner_path, [(("shared_" if shared else "") + r, rows) for r, rows in fused]
        role = (_ATTENTION if in_attention else _MLP).get(leaf)
        if role is None or role == "q" and not _is_query_sized(dec, owner_path, out_features):
            return None
        return kind, owner_path, [(("shared_" if shared else "") + role, None)]
    if param.ndim == 3 and attr in _EXPERT_STACKS:  # (experts, out, in), applied by F.linear per expert
        # only transformers' experts classes (use_experts_implementation: their eager forward applies
        # F.linear to each expert's slice) in the untransposed layout; others (Llama-4's batched matmul) not
        if not hasattr(owner, "is_transposed") or owner.is_transposed:
            return None
        roles = _EXPERT_STACKS[attr]
        if len(roles) == 1:
            return "functional", f"{owner_path}.{attr}", [("expert_" + roles[0], None)]
        half = param.shape[1] // 2
        if getattr(owner, "is_concatenated", True):
            blocks = [slice(0, half), slice(half, 2 * half)]
        else:  # interleaved gate0, up0, gate1, up1, ...
            blocks = [slice(0, 2 * half, 2), slice(1, 2 * half, 2)]
        return "functional", f"{owner_path}.{attr}", [("expert_" + r, b) for r, b in zip(roles, blocks)]
    if param.ndim == 2 and attr == "weight" and leaf in ("gate", "router") and not in_attention:
        return "functional", owner_path, [("router", None)]
    return None


def _heads(dec, attention_path: str) -> tuple[int, int, int]:
    """(query heads, head_dim, key/value heads) of an attention module, from its attributes or config."""
    attn, cfg = dec.get_submodule(attention_path), dec.config
    heads = getattr(attn, "num_heads", None) or cfg.num_attention_heads
    head_dim = (getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
                or getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = next((getattr(attn, a) for a in ("num_key_value_heads", "num_kv_heads", "kv_heads")
                     if isinstance(getattr(attn, a, None), int)), None)
    return heads, head_dim, kv_heads or getattr(cfg, "num_key_value_heads", None) or heads


def _is_query_sized(dec, owner_path: str, out_features: int) -> bool:
    """A q projection gives heads × head_dim outputs; one that gives more also computes something else
    (Qwen3-Next's attention output gate) and is no pure q."""
    try:
        heads, head_dim, _ = _heads(dec, owner_path.rsplit(".", 1)[0])
    except (AttributeError, TypeError, ZeroDivisionError):
        return True  # no head layout to check against
    return out_features == heads * head_dim


# Fused q/k/v matrices by (model_type, module name): a layout is only trusted where it was read from that
# family's modeling code and tested (tests/test_architectures.py); any other fused q/k/v is refused.
_PER_HEAD_QKV = {("gpt_neox", "query_key_value"), ("bloom", "query_key_value"), ("persimmon", "query_key_value")}
_FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "W_pack", "query_key_value", "Wqkv", "qkv")


def _fused_layout(dec, owner_path, leaf, out_features, in_attention, model_type):
    """[(role, rows)] for a fused matrix, None when `leaf` is not a fused name. A fused name whose layout
    is unknown for this model type, or whose size does not add up, gives [] (not placed; NotCovered)."""
    if leaf == "gate_up_proj" and not in_attention:
        if model_type not in ("phi3", "glm", "glm4"):  # [gate | up], read from these families' MLPs
            return []
        half = out_features // 2
        return [("gate", slice(0, half)), ("up", slice(half, 2 * half))] if out_features % 2 == 0 else []
    if not in_attention or leaf not in _FUSED_QKV_NAMES:
        return None
    heads, head_dim, kv_heads = _heads(dec, owner_path.rsplit(".", 1)[0])
    attn = dec.get_submodule(owner_path.rsplit(".", 1)[0])
    if (model_type, leaf) == ("falcon", "query_key_value"):
        if getattr(attn, "new_decoder_architecture", False):  # per kv group: its query heads, then k, then v
            return _grouped_heads(heads // attn.num_kv_heads, attn.num_kv_heads, head_dim, out_features)
        if getattr(attn, "multi_query", False):  # [q heads | one k | one v]
            return _contiguous((heads * head_dim, head_dim, head_dim), out_features)
        return _grouped_heads(1, heads, head_dim, out_features)  # per head: q, k, v
    if (model_type, leaf) == ("gpt_bigcode", "c_attn") and not getattr(attn, "multi_query", True):
        return _grouped_heads(1, heads, head_dim, out_features)  # (heads, 3·head_dim): per head q, k, v
    if (model_type, leaf) == ("gpt_bigcode", "c_attn"):
        return _contiguous((heads * head_dim, head_dim, head_dim), out_features)  # [q | one k | one v]
    if (model_type, leaf) in _PER_HEAD_QKV:
        return _grouped_heads(1, heads, head_dim, out_features)
    if (model_type, leaf) in (("phi3", "qkv_proj"), ("gpt2", "c_attn")):  # [q heads | k heads | v heads]
        return _contiguous((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), out_features)
    return []


def _contiguous(sizes, out_features):
    """[q | k | v] one after the other (Phi-3's qkv_proj, GPT-2's c_attn)."""
    if sum(sizes) != out_features:
        return []
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [(r, slice(e - s, e)) for r, s, e in zip("qkv", sizes, ends)]


def _grouped_heads(q_per_group: int, groups: int, head_dim: int, out_features: int):
    """Per group, q_per_group query heads then one key and one value head (GPT-NeoX: q, k, v per head)."""
    width = (q_per_group + 2) * head_dim
    if groups * width != out_features:
        return []
    base = (torch.arange(groups) * width).unsqueeze(1)
    q = (base + torch.arange(q_per_group * head_dim)).flatten()
    k = (base + q_per_group * head_dim + torch.arange(head_dim)).flatten()
    return [("q", q), ("k", k), ("v", k + head_dim)]


def _role_rank(role: str) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


def _roles_by_layer(found) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for layer, role, *_ in found:
        out.setdefault(layer, []).append(role)
    return {k: sorted(v, key=_role_rank) for k, v in sorted(out.items())}


def _refuse_shared(dec, prefix: str, probed: set[int]) -> None:
    """A probed weight that several modules hold (layers sharing weights) gets one gradient summed over
    its uses: per-module hooks would each see one use. Refused rather than measured wrong."""
    paths: dict[int, list[str]] = {}
    for name, param in dec.named_parameters(remove_duplicate=False):
        if id(param) in probed:
            paths.setdefault(id(param), []).append(prefix + name)
    shared = [p for p in paths.values() if len(p) > 1]
    if shared:
        raise ValueError(f"{' and '.join(shared[0])} are one shared weight: its per-example gradient sums "
                         "every use, which the probe does not form; leave it out with --modules ROLE_OR_NAME ...")


def _spans(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


def _check_coverage(model, found, unprobed) -> None:
    """Every weight matrix placed, and every layer a complete attention block and a complete MLP."""
    names = list(dict.fromkeys(_leaf(p.rsplit(".", 1)[0]) if p.endswith(".weight") else _leaf(p) for p in unprobed))
    problems = [f"not placed by any role: {' '.join(names)} (e.g. {unprobed[0]})"] if unprobed else []
    for layer, roles in _roles_by_layer(found).items():
        have = set(roles)
        dupes = sorted({r for r in roles if roles.count(r) > 1})
        attention_ok = {"q", "k", "v", "o"} <= have
        mlp_ok = ({"up", "down"} <= have or {"router", "expert_up", "expert_down"} <= have)
        if dupes or not attention_ok or not mlp_ok:
            problems.append(f"layer {layer} yields roles {' '.join(roles)}"
                            + (f" ({' '.join(dupes)} more than once)" if dupes else ""))
    if problems:
        raise NotCovered(
            f"{type(model).__name__}: curate's architecture map does not cover this model: "
            + "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
            + ". Choose what to probe with --modules ROLE_OR_NAME ... (roles: " + " ".join(ROLE_ORDER)
            + "; or module names such as those above), or pass --allow-partial to probe what was placed "
            "(recorded in the manifest)")


def _select(found, modules, dec, prefix):
    """The entries `modules` asks for: a role name selects that role, any other item the matrices whose
    module (or stacked parameter) is called so; Linear/Conv1D modules the map did not place are probed
    whole under their own name as role."""
    from transformers.pytorch_utils import Conv1D

    chosen, seen = [], set()
    for item in modules:  # a role name selects that role only (`gate` is never Mixtral's router module)
        hits = [f for f in found if (f[1] == item if item in ROLE_ORDER else _leaf(f[2]) == item)]
        if not hits and item not in ROLE_ORDER:
            for path, mod in dec.named_modules():
                layer = _LAYER.search(path + ".")
                if path.rsplit(".", 1)[-1] == item and layer and isinstance(mod, (nn.Linear, Conv1D)):
                    hits.append((int(layer.group(1)), item, prefix + path, Site("linear", mod, mod.weight), None))
        if not hits:
            names = sorted({_leaf(f[2]) for f in found} | {p.rsplit(".", 1)[-1] for p, m in dec.named_modules()
                                                        if _LAYER.search(p + ".") and isinstance(m, (nn.Linear, Conv1D))})
            raise ValueError(f"--modules {item}: no role or module of that name in {type(dec).__name__}'s layers; "
                             f"roles found: {' '.join(sorted({f[1] for f in found}, key=_role_rank)) or 'none'}; "
                             f"module names: {' '.join(names) or 'none'}. Choose among them with --modules NAME ...")
        for h in hits:
            if h[2] not in seen:
                seen.add(h[2])
                chosen.append(h)
    return chosen


def _leaf(name: str) -> str:
    return name.split("[", 1)[0].rsplit(".", 1)[-1]
