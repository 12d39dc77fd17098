"""The norm step's precision and form choice (curate.gradients): what runs on CPU here, and the rules the
CUDA path follows (benchmarks/gpu_check.py measures it on a GPU)."""

import itertools

import pytest
import torch

from curate import gradients
from curate.gradients import gram_is_cheaper, per_example_block_sq_norms, tf32_enabled, tf32_matmuls


def test_cpu_form_choice_is_the_multiply_add_count():
    # balance 0 (CPU): Gram iff T·(d_in + d_out) < d_in·d_out, the rule outputs were always computed by
    for t, d_in, d_out in itertools.product((1, 7, 64, 300, 1024, 4096), (16, 576, 1536), (64, 256, 8960)):
        assert gram_is_cheaper(t, d_in, d_out, 1, 0.0) == (t * (d_in + d_out) < d_in * d_out)


def test_memory_traffic_moves_the_choice_towards_the_form_that_writes_less():
    # T=1024, 1536 -> 8960: fewer FLOPs in the Gram form; and it writes 2 T² floats, not d_in·d_out
    assert gram_is_cheaper(1024, 1536, 8960, 1, 0.0) and gram_is_cheaper(1024, 1536, 8960, 1, 180.0)
    # T=2048, 1536 -> 256 (a GQA k/v projection): the product form at any balance
    assert not gram_is_cheaper(2048, 1536, 256, 1, 0.0) and not gram_is_cheaper(2048, 1536, 256, 1, 180.0)
    # near the FLOP break-even, bytes decide: the product's d_in·d_out fp32 squares cost more than T² Grams
    t = 1536 * 8960 // (1536 + 8960) - 10  # Gram slightly fewer FLOPs
    assert gram_is_cheaper(t, 1536, 8960, 1, 180.0)
    t2 = 1536 * 8960 // (1536 + 8960) + 40  # Gram slightly more FLOPs, but far fewer bytes
    assert not gram_is_cheaper(t2, 1536, 8960, 1, 0.0) and gram_is_cheaper(t2, 1536, 8960, 1, 180.0)


def test_cpu_keeps_fp32_for_low_precision_gradients():
    # under autocast on CPU the output gradient is bf16; the norms are the fp32 norms of the same values
    gen = torch.Generator().manual_seed(0)
    for t in (3, 200):  # both forms
        a = torch.randn(2, t, 16, generator=gen)
        g = torch.randn(2, t, 24, generator=gen).bfloat16()
        got = per_example_block_sq_norms(a, g, [None, slice(0, 8)])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, per_example_block_sq_norms(a, g.float(), [None, slice(0, 8)]), rtol=0, atol=0)


def test_without_out_dtype_low_precision_inputs_are_upcast_not_rounded():
    # CPU has no bmm out_dtype: the fallback multiplies the fp16/bf16 values exactly in fp32, so an fp16
    # Gram entry past 65504 stays finite and nothing is rounded to the input precision
    assert not gradients._out_dtype_bmm(torch.device("cpu"), torch.float16)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        x, y = torch.randn(2, 8, 16, generator=gen).to(dtype) * 150, torch.randn(2, 16, 4, generator=gen).to(dtype) * 150
        out = gradients._bmm_fp32(x, y)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out, torch.bmm(x.float(), y.float()), rtol=0, atol=0)


def test_a_failing_call_is_not_taken_for_a_missing_kernel(monkeypatch):
    # the support probe runs once on a 1x1x1 product; a real call's error (out of memory) propagates
    gradients._OUT_DTYPE_BMM.pop(("cpu", torch.bfloat16), None)
    assert not gradients._out_dtype_bmm(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setitem(gradients._OUT_DTYPE_BMM, ("cpu", torch.bfloat16), True)
    x = torch.ones(1, 2, 2, dtype=torch.bfloat16)
    with pytest.raises(Exception):  # CPU has no out_dtype kernel: the error surfaces, nothing is remembered
        gradients._bmm_fp32(x, x)
    assert gradients._OUT_DTYPE_BMM[("cpu", torch.bfloat16)] is True


@pytest.mark.parametrize("before", [False, True])
def test_tf32_switch_is_scoped(before):
    with tf32_matmuls(before):
        with tf32_matmuls(True):
            assert tf32_enabled()
        assert tf32_enabled() == before
        with tf32_matmuls(False):
            assert not tf32_enabled()
        assert tf32_enabled() == before


def test_per_example_loss_is_the_mean_over_its_own_targets(tiny_model):
    # the loss sum without atomics: each row's mean NLL, compared with a per-example loop
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (3, 12), generator=gen)
    mask = torch.zeros(3, 12, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, 2:7] = 1
    mask[2, 10:] = 1
    nll = gradients.token_nll(tiny_model, ids, torch.ones_like(ids), mask)
    for i in range(3):
        logits = tiny_model(input_ids=ids[i:i + 1]).logits[0, :-1]
        target = mask[i, 1:].bool()
        ref = torch.nn.functional.cross_entropy(logits[target], ids[i, 1:][target])
        torch.testing.assert_close(nll[i], ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_the_norm_step_is_not_lowered_by_the_callers_autocast(amp):
    # the probe's backward hooks run under its autocast: the norms must still be the fp32 ones, and an
    # fp16 Gram entry past 65504 must not become inf
    gen = torch.Generator().manual_seed(3)
    for t in (3, 200):  # both forms
        a = torch.randn(2, t, 16, generator=gen) * 150
        g = (torch.randn(2, t, 24, generator=gen) * 150).to(amp)
        plain = per_example_block_sq_norms(a, g, [None, slice(0, 8)])
        with torch.autocast("cpu", dtype=amp):
            inside = per_example_block_sq_norms(a, g, [None, slice(0, 8)])
        assert inside.dtype == torch.float32 and torch.isfinite(inside).all()
        torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_host_syncs_do_not_grow_with_the_number_of_modules():
    # On CUDA an op whose result the host reads (item, nonzero, a boolean mask, a list index copied from
    # host memory) waits for every queued kernel; once per module, that idles the GPU ~200 times a batch.
    # Counted here on CPU through the dispatcher: the same few per batch for 2 layers as for 4.
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from curate.roles import role_map
    from tests.test_gradients import batch, make_examples

    # ops whose result the host reads, and tensors made from host data (aten.lift_fresh: torch.tensor(...)
    # or a list index, which on CUDA is a copy from pageable memory, waiting for the queue)
    syncing = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.is_nonzero.default", "aten.lift_fresh.default"}

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in syncing:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = []
    for layers in (2, 4):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             attn_implementation="sdpa")).eval().requires_grad_(False)
        rmap, inputs = role_map(model), batch(make_examples(4))
        gradients.probe_batch(model, rmap, *inputs)  # plain_head's one-time check
        with Syncs() as syncs:
            gradients.probe_batch(model, rmap, *inputs)
        counts.append(len(syncs.ops))
    assert counts[0] == counts[1] and counts[0] <= 4, (counts, syncs.ops)
