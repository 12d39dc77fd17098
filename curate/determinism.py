"""Bit-reproducible probes on CUDA: torch's deterministic algorithms around each probe batch.

Kernels that add with atomics sum in no fixed order, so the same example's norms can differ in their last
bits from run to run. The one every probe meets is attention's backward: flash and memory-efficient SDPA
accumulate dQ with atomics, and `torch.use_deterministic_algorithms(True, warn_only=True)` only warns
about it ("Flash Attention defaults to a non-deterministic algorithm"); only strict mode (warn_only=False)
makes them take their deterministic kernels (pytorch docs/source/notes/randomness.rst, "CUDA Scaled Dot
Product Attention"). Strict mode raises instead on an op with no deterministic kernel, and on any cuBLAS
call when CUBLAS_WORKSPACE_CONFIG is not ":4096:8" or ":16:8". So curate.gradients.probe_batch tries
strict first; a model that raises is probed in warn-only mode from then on, with one warning."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

# Device types whose probes run under deterministic algorithms. CPU kernels already sum in a fixed order
# (every CPU output is the same bytes on every run), so the flags stay off there.
DEVICE_TYPES = ("cuda",)

# torch's flags are process-wide: two scopes overlapping in threads of one process (a dask worker with
# several threads) would cut each other's scope short and leave strict mode on after both. One at a time.
_SCOPE = threading.RLock()


@contextmanager
def deterministic(device: torch.device, strict: bool = True):
    """torch's deterministic algorithms inside the block on a DEVICE_TYPES device (strict: an op with no
    deterministic kernel raises RuntimeError; else it warns and runs its usual kernel); the previous
    settings restored after it, nothing done elsewhere. Uninitialised memory is not filled with NaN, as
    deterministic mode otherwise does on every torch.empty: no kernel the probe runs reads memory it has
    not written, and the fill would cost a pass over every new buffer. Scopes in several threads of one
    process run one at a time (the flags are process-wide)."""
    if device.type not in DEVICE_TYPES:
        yield
        return
    with _SCOPE:
        before = (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled(),
                  torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=not strict)
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.utils.deterministic.fill_uninitialized_memory = before[2]


def is_determinism_error(error: BaseException) -> bool:
    """Whether `error` is strict deterministic mode refusing an op (or cuBLAS without its workspace
    setting): torch's messages for both name use_deterministic_algorithms."""
    return isinstance(error, RuntimeError) and "use_deterministic_algorithms" in str(error)


def reason(error: BaseException) -> str:
    """The first sentence of a determinism error: the op (or setting) that has no deterministic path."""
    first = str(error).strip().split("\n")[0]
    return first.split(", but you set")[0].split(". ")[0]
