"""Deterministic algorithms around the probe (curate.determinism): strict on CUDA, scoped, and a model with
an op that has no deterministic kernel falls back to warn-only mode once, with a warning, the same norms.
CUDA's own kernels run in benchmarks/gpu_check.py; here the scope is widened to CPU to drive the logic."""

import logging

import pytest
import torch
from torch._prims_common import alert_not_deterministic

from curate import determinism
from tests.test_gradients import make_examples, probe


def flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)


def test_strict_only_inside_the_block_and_only_on_cuda():
    before = flags()
    with determinism.deterministic(torch.device("cpu")):
        assert flags() == before
    with determinism.deterministic(torch.device("cuda")):  # only flags: no GPU is touched
        # strict: warn-only leaves flash / memory-efficient attention's backward on its atomic kernel
        assert flags() == (True, False, False)
    with determinism.deterministic(torch.device("cuda"), strict=False):
        assert flags() == (True, True, False)
    assert flags() == before


def test_settings_are_restored_when_the_block_raises():
    before = flags()
    with pytest.raises(ValueError):
        with determinism.deterministic(torch.device("cuda")):
            raise ValueError("boom")
    assert flags() == before


def test_only_determinism_errors_are_recognised():
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError) as e:
            alert_not_deterministic("histc_cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    assert determinism.is_determinism_error(e.value)
    assert determinism.reason(e.value) == "histc_cuda does not have a deterministic implementation"
    assert not determinism.is_determinism_error(RuntimeError("CUDA out of memory"))
    assert not determinism.is_determinism_error(ValueError("use_deterministic_algorithms"))


@pytest.fixture
def strict_on_cpu(monkeypatch):
    monkeypatch.setattr(determinism, "DEVICE_TYPES", ("cpu",))


def test_the_probe_runs_under_strict_mode_and_gives_the_same_norms(tiny_model, strict_on_cpu):
    # every op of the probe (loss without atomics, boolean-mask writes, gathers) has a deterministic path
    examples = make_examples(5)
    before = flags()
    seen = []
    hook = tiny_model.model.layers[0].mlp.register_forward_hook(lambda *_: seen.append(flags()))
    try:
        loss, norms = probe(tiny_model, examples)
    finally:
        hook.remove()
    # (plain_head's one-time check of the model's own forward runs first, outside the probe's scope)
    assert seen[-1] == (True, False, False) and flags() == before
    assert getattr(tiny_model, "_curate_not_deterministic", None) is None
    determinism.DEVICE_TYPES = ()
    loss2, norms2 = probe(tiny_model, examples)
    assert torch.equal(loss, loss2) and torch.equal(norms, norms2)


def test_an_op_without_a_deterministic_kernel_falls_back_once_with_a_warning(tiny_model, strict_on_cpu, caplog):
    examples = make_examples(4)
    clean = probe(tiny_model, examples)
    modes = []

    def histc_like(module, args, out):  # what MoE routers' torch.histc does on CUDA in strict mode
        modes.append(torch.is_deterministic_algorithms_warn_only_enabled())
        alert_not_deterministic("histc_cuda")

    hook = tiny_model.model.layers[1].mlp.register_forward_hook(histc_like)
    try:
        with caplog.at_level(logging.WARNING, logger="curate.gradients"):
            first = probe(tiny_model, examples)
            second = probe(tiny_model, examples)
    finally:
        hook.remove()
    # strict once (raised), then warn-only for this and every later batch of the same model
    assert modes == [False, True, True]
    warned = [r.getMessage() for r in caplog.records if "deterministic" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("histc_cuda does not have a deterministic implementation")
    assert "reproducible to float rounding" in warned[0]
    for got in (first, second):
        assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])


def test_other_errors_are_not_retried(tiny_model, strict_on_cpu):
    calls = []

    def broken(module, args, out):
        calls.append(1)
        raise RuntimeError("CUDA out of memory")

    hook = tiny_model.model.layers[0].mlp.register_forward_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            probe(tiny_model, make_examples(2))
    finally:
        hook.remove()
    assert calls == [1] and getattr(tiny_model, "_curate_not_deterministic", None) is None


def test_scopes_in_threads_run_one_at_a_time_and_restore_the_flags():
    # the flags are process-wide: overlapping scopes would end each other's early and leave strict mode on
    import threading

    before = flags()
    inside, seen = threading.Event(), []

    def first():
        with determinism.deterministic(torch.device("cuda")):
            inside.set()
            threading.Event().wait(0.3)
            seen.append(("first ends", flags()))

    def second():
        inside.wait()
        with determinism.deterministic(torch.device("cuda"), strict=False):
            seen.append(("second runs", flags()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [("first ends", (True, False, False)), ("second runs", (True, True, False))]
    assert flags() == before


def test_a_callers_autocast_does_not_reach_the_probe(tiny_model):
    # an fp32 probe (autocast_dtype None) inside the caller's bf16 autocast gives the fp32 numbers
    examples = make_examples(4)
    clean = probe(tiny_model, examples)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = probe(tiny_model, examples)
    assert torch.equal(clean[0], inside[0]) and torch.equal(clean[1], inside[1])
