"""A probe model split by accelerate's device_map (curate.models.load_model across GPUs). On CPU, models
are dispatched with accelerate's real hooks (disk offload: weights on the meta device between forwards,
loaded by AlignDevicesHook for each call) and must give the undispatched model's losses and norms, which
equal plain autograd's. The split/fit decision is tested on meta skeletons of full-size configs with
faked GPU memory. Tests that need CUDA move layers between the GPU and the CPU for real."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from accelerate import dispatch_model

from curate import models
from curate.gradients import probe_batch
from curate.roles import role_map
from tests.test_gradients import batch, make_examples, naive_norms

GIB = 1 << 30
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_llama(tied: bool = True, layers: int = 3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny(model_type: str, **extra):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, pad_token_id=0, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if model_type == "gemma2":
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)  # logits of tens: the softcap matters
    return model.eval().requires_grad_(False)


def dispatched(model, device_map: dict, tmp_path, **kwargs):
    """A copy of `model` dispatched by accelerate (its hooks attached; "disk" entries offloaded to tmp_path)."""
    out = dispatch_model(copy.deepcopy(model), device_map, offload_dir=str(tmp_path / "offload"), **kwargs)
    assert any(hasattr(m, "_hf_hook") for m in out.modules())
    return out


def run(model, examples, device="cpu"):
    ids, att, mask = (x.to(device) for x in batch(examples))
    return probe_batch(model, role_map(model), ids, att, mask)


def assert_same_probe(split, whole, examples, device="cpu", rtol=1e-6) -> None:
    """The dispatched model's losses and squared norms are the undispatched model's (fp32, same math), on
    the inputs' device."""
    got, want = run(split, examples, device), run(whole, examples)
    assert got.loss.device.type == got.sq_norms.device.type == torch.device(device).type
    torch.testing.assert_close(got.loss.cpu(), want.loss, rtol=rtol, atol=0)
    torch.testing.assert_close(got.sq_norms.cpu(), want.sq_norms, rtol=rtol, atol=0)


def assert_autograd(whole, split, examples, device="cpu") -> None:
    """... and they are plain autograd's on the undispatched model (tests.autograd_reference)."""
    res = run(split, examples, device)
    for i, (ids, mask) in enumerate(examples):
        ref_loss, ref = naive_norms(whole, ids, mask, role_map(whole).names)
        assert res.loss[i].item() == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(res.sq_norms[i].cpu().double().sqrt(), ref, rtol=1e-4, atol=0)


LLAMA_CPU_DISK = {  # layer 1 and the final norm on disk: their weights are loaded by accelerate's hooks per call
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "cpu", "model.norm": "disk", "lm_head": "cpu"}
LLAMA_PER_MODULE = {  # inside layer 2, each sub-block its own unit, some on disk, with an untied head on disk
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
    "model.layers.2.input_layernorm": "cpu", "model.layers.2.self_attn": "disk",
    "model.layers.2.post_attention_layernorm": "disk", "model.layers.2.mlp": "cpu", "model.norm": "cpu",
    "lm_head": "disk"}


@pytest.mark.parametrize("tied, device_map", [(True, LLAMA_CPU_DISK), (False, LLAMA_PER_MODULE)],
                         ids=["layers-on-disk", "sub-blocks-and-head-on-disk"])
def test_probe_through_accelerate_hooks_is_the_undispatched_probe(tmp_path, tied, device_map):
    whole = tiny_llama(tied)
    split = dispatched(whole, device_map, tmp_path)
    q = split.model.layers[1 if tied else 0].self_attn.q_proj
    assert q.weight.device.type == "meta" and q._hf_hook.offload  # the weights really come from the hooks
    examples = make_examples(5)
    assert_same_probe(split, whole, examples)
    assert_autograd(whole, split, examples[:3])


def test_a_head_that_post_processes_its_logits_through_accelerate_hooks(tmp_path):
    """Gemma-2's softcap: target_logps runs the model's own forward (logits_to_keep) through the root hook."""
    whole = tiny("gemma2", head_dim=16, final_logit_softcapping=30.0)
    split = dispatched(whole, {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                               "model.layers.1": "cpu", "model.norm": "disk", "lm_head": "cpu"}, tmp_path)
    assert_same_probe(split, whole, make_examples(4))
    assert_autograd(whole, split, make_examples(2))


def test_moe_routers_and_expert_stacks_through_accelerate_hooks(tmp_path):
    """Routers and expert stacks (found by their parameter objects) work under hooks that keep the weights
    in place, built after dispatch."""
    whole = tiny("qwen3_moe", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    split = dispatched(whole, {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu",
                               "model.norm": "cpu", "lm_head": "cpu"}, tmp_path, force_hooks=True)
    assert_same_probe(split, whole, make_examples(4))


def test_offloaded_routers_and_expert_stacks_are_refused_by_name(tmp_path):
    """Offloading swaps a parameter object at every forward: the router and expert sites of the offloaded
    layer could never be matched, so the probe says so before running."""
    whole = tiny("qwen3_moe", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    split = dispatched(whole, {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                               "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}, tmp_path)
    with pytest.raises(RuntimeError, match=r"layers\.1\.mlp\..*offloaded to CPU or disk by accelerate"):
        run(split, make_examples(2))
    # a role map built before dispatching names parameters the model no longer holds
    whole = tiny("qwen3_moe", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    rmap = role_map(whole)
    dispatch_model(whole, {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                           "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
                   offload_dir=str(tmp_path / "again"))
    with pytest.raises(RuntimeError, match="replaced since the role map was built"):
        probe_batch(whole, rmap, *batch(make_examples(2)))


# ---- the decision: one GPU, split across GPUs, or refused -------------------------------------------------

def full_size(tmp_path, name: str, **cfg):
    """A ModelRef to a folder holding only a config: enough for the meta skeleton plan_device_map sizes."""
    folder = tmp_path / name
    transformers.LlamaConfig(**cfg).save_pretrained(folder)
    return models.ModelRef(name, str(folder))


@pytest.fixture
def llama70b(tmp_path):  # Llama-3-70B's shapes, bf16 on disk: 70.6 B parameters, 262.8 GiB in fp32
    return full_size(tmp_path, "llama-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, dtype="bfloat16")


@pytest.fixture
def llama8b(tmp_path):  # Llama-3-8B's shapes: 8.0 B parameters, 29.9 GiB in fp32
    return full_size(tmp_path, "llama-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, dtype="bfloat16")


@pytest.fixture
def gpus(monkeypatch):
    """fake(n, free_gib): torch sees n GPUs with free_gib GiB free each (a list: per GPU); current GPU 0."""
    def fake(n: int, free_gib):
        free = [free_gib] * n if isinstance(free_gib, (int, float)) else list(free_gib)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(free[i] * GIB), int(80 * GIB)))
    return fake


def test_sizes_are_fp32_from_the_skeleton(llama70b, llama8b):
    assert models.fp32_bytes(models._fp32_skeleton(llama70b)) / GIB == pytest.approx(262.83, abs=0.01)
    assert models.fp32_bytes(models._fp32_skeleton(llama8b)) / GIB == pytest.approx(29.92, abs=0.01)
    assert models.skeleton(llama70b).model.embed_tokens.weight.dtype == torch.bfloat16  # the cache is untouched


def test_a_model_that_fits_one_gpu_with_headroom_stays_on_it(llama8b, gpus):
    gpus(4, 80)  # 29.9 GiB + 16 GiB headroom < 80
    assert models.plan_device_map(llama8b, "cuda") is None


def test_cpu_and_explicit_devices_are_not_planned(llama70b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: pytest.fail("queried a GPU"))
    assert models.plan_device_map(llama70b, "cpu") is None
    assert models.plan_device_map(llama70b, "cuda:1") is None


def test_a_model_too_big_for_one_gpu_is_split_across_all_of_them(llama70b, gpus):
    gpus(8, 80)
    device_map = models.plan_device_map(llama70b, "cuda")
    assert set(device_map.values()) == set(range(8))
    # whole decoder layers (never split inside one), in order, covering every weight of the model
    layers = [k for k in device_map if k.startswith("model.layers.")]
    assert layers == [f"model.layers.{i}" for i in range(80)]
    assert [device_map[k] for k in layers] == sorted(device_map[k] for k in layers)
    skel = models._fp32_skeleton(llama70b)
    owners = {name.rsplit(".", 1)[0] for name, _ in skel.named_parameters()}
    assert all(any(o == k or o.startswith(k + ".") for k in device_map) for o in owners)
    # each GPU holds at most its free memory less the headroom
    for gpu in range(8):
        held = sum(models.fp32_bytes(skel.get_submodule(k)) for k, d in device_map.items() if d == gpu)
        assert held <= 80 * GIB - models.headroom(80 * GIB)


def test_a_model_tight_on_one_of_several_gpus_is_split_for_headroom(llama8b, gpus):
    gpus(2, 36)  # 29.9 GiB fits 36 GiB, but not with 7.2 GiB (20%) kept for activations
    assert set(models.plan_device_map(llama8b, "cuda").values()) == {0, 1}


def test_a_model_tight_on_the_only_gpu_loads_there_with_a_warning(llama8b, gpus, caplog):
    gpus(1, 32)
    with caplog.at_level(logging.WARNING, logger="curate.models"):
        assert models.plan_device_map(llama8b, "cuda") is None
    assert "leave 2.1 GiB of GPU 0 free" in caplog.text and "--batch-tokens" in caplog.text


def test_a_model_too_big_for_the_only_gpu_is_a_model_error_naming_the_sizes(llama70b, gpus):
    gpus(1, 80)
    with pytest.raises(models.ModelError, match=r"llama-70b: its weights take 262\.8 GiB in fp32 and the GPU has "
                                                r"80\.0 GiB free"):
        models.plan_device_map(llama70b, "cuda")


def test_a_model_too_big_for_all_gpus_together_is_a_model_error_naming_the_sizes(llama70b, gpus):
    gpus(4, [80, 80, 60, 10])  # 262.8 GiB > 64 + 64 + 48 + 8 usable
    with pytest.raises(models.ModelError, match=r"262\.8 GiB in fp32 and do not fit across the 4 GPUs \(free: "
                                                r"80\.0, 80\.0, 60\.0, 10\.0 GiB\) while keeping 20%"):
        models.plan_device_map(llama70b, "cuda")


def test_load_model_loads_with_the_planned_device_map(tmp_path, monkeypatch):
    """The planned map goes to from_pretrained, and the model is not then moved to `device` as a whole (here
    the map is all CPU, and "cuda" would fail on a machine without one)."""
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    ref = models.ModelRef("tiny", str(folder))
    planned = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu", "model.norm": "cpu",
               "lm_head": "cpu"}
    monkeypatch.setattr(models, "plan_device_map", lambda r, d: planned if d == "cuda" else None)
    calls, load = [], transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: calls.append(kw.get("device_map")) or load(*a, **kw))
    split, whole = models.load_model(ref, "cuda"), models.load_model(ref, "cpu")
    assert calls == [planned, None]
    assert not split.training and not any(p.requires_grad for p in split.parameters())
    assert_same_probe(split, whole, make_examples(3))


# ---- CUDA: layers really on two devices ----------------------------------------------------------------

GPU_SPLITS = {  # main_device "cpu": the "cpu" entries run on the CPU, not offloaded to the GPU
    "llama": (lambda: tiny_llama(tied=True), {
        "model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu", "model.layers.1": 0,
        "model.layers.2": "cpu", "model.norm": 0, "lm_head": 0}),
    "llama-head-apart": (lambda: tiny_llama(tied=False), {  # the head on another device than the embeddings
        "model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu", "model.layers.1": 0,
        "model.layers.2": 0, "model.norm": "cpu", "lm_head": "cpu"}),
    "gemma2": (lambda: tiny("gemma2", head_dim=16, final_logit_softcapping=30.0), {
        "model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu", "model.layers.1": 0,
        "model.norm": "cpu", "lm_head": 0}),
    "qwen3_moe": (lambda: tiny("qwen3_moe", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2), {
        "model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu", "model.layers.1": 0,
        "model.norm": 0, "lm_head": 0}),
}


@cuda
@pytest.mark.parametrize("family", sorted(GPU_SPLITS))
def test_layers_on_the_gpu_and_the_cpu_give_the_single_device_probe(tmp_path, family):
    make, device_map = GPU_SPLITS[family]
    whole = make()
    split = dispatched(whole, device_map, tmp_path, main_device="cpu")
    devices = {p.device.type for p in split.parameters()}
    assert devices == {"cpu", "cuda"}
    examples = make_examples(4)
    assert_same_probe(split, whole, examples, device="cuda", rtol=1e-4)  # CUDA's fp32 matmuls vs the CPU's
    assert_autograd(whole, split, examples[:2], device="cuda")


def test_another_gpu_that_holds_the_model_alone_is_named_not_taken(llama8b, gpus, monkeypatch):
    # GPU 0 is busy, 1 is free (nothing to split over): switching the process's GPU would strand models
    # loaded earlier and the inputs, so the error names the GPU to choose with CUDA_VISIBLE_DEVICES
    gpus(2, [1.5, 100])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("changed the process's GPU"))
    monkeypatch.delenv(models.SINGLE_GPU, raising=False)
    with pytest.raises(models.ModelError, match=r"GPU 0 has 1\.5 GiB free; GPU 1 holds it alone: choose it with "
                                                r"CUDA_VISIBLE_DEVICES"):
        models.plan_device_map(llama8b, "cuda")


def test_a_dask_gpu_task_never_leaves_its_own_gpu(llama8b, gpus, monkeypatch):
    # dask-cuda shows a worker the other workers' GPUs after its own: neither a move nor a split onto them
    monkeypatch.setenv(models.SINGLE_GPU, "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("moved to another worker's GPU"))
    gpus(2, [36, 80])  # alone, GPU 1 would be chosen; in a worker, GPU 0 keeps it (with the warning)
    assert models.plan_device_map(llama8b, "cuda") is None
    gpus(2, [20, 80])  # too small for the weights alone: an error, not a split
    with pytest.raises(models.ModelError, match=r"29\.9 GiB in fp32"):
        models.plan_device_map(llama8b, "cuda")
