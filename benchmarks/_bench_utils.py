"""Helpers for benchmarks/probe_bench.py: synthetic batches, a peak-memory meter, machine facts."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from curate.batching import right_pad, token_batches


@dataclass
class Batch:
    rows: list[int]              # example indices, in the order of the padded rows
    input_ids: torch.Tensor      # (B, T) right-padded
    attention: torch.Tensor
    loss_mask: torch.Tensor
    real_tokens: int             # unpadded tokens in this batch


def make_examples(n: int, seq_len: int, vocab: int, mixed: bool, seed: int = 0):
    """Random token ids; the loss mask covers the second half of each sequence, like an assistant reply.
    With `mixed`, lengths are uniform in [seq_len/2, seq_len], so batches carry padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g)) if mixed else seq_len
        ids = torch.randint(0, vocab, (t,), generator=g).tolist()
        out.append((ids, [0] * (t // 2) + [1] * (t - t // 2)))
    return out


def pack(examples, rows: list[int], batch_tokens: int, device: str) -> list[Batch]:
    """The probe stage's batching: longest first, at most batch_tokens padded tokens per batch."""
    batches = []
    for b in token_batches([len(examples[r][0]) for r in rows], batch_tokens):
        sel = [rows[i] for i in b]
        ids, att, mask = right_pad([examples[r][0] for r in sel], [examples[r][1] for r in sel], device)
        batches.append(Batch(sel, ids, att, mask, int(att.sum())))
    return batches


def autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _cpu_peak_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


_LIBC = ctypes.CDLL(None) if platform.system() == "Linux" else None


class PeakMemory:
    """Peak memory above the level at entry, in MiB (None where it cannot be measured).
    CUDA: max_memory_allocated after reset_peak_memory_stats. CPU: the kernel's peak RSS (VmHWM), reset on
    entry via /proc/self/clear_refs, after gc and malloc_trim hand freed heap pages back to the OS, so
    memory a previous method freed but glibc kept cannot hide this method's allocations."""

    def __init__(self, device: str):
        self.device, self.mib = device, None

    @staticmethod
    def method(device: str) -> str:
        if device == "cuda":
            return "in-process, per timed rep: torch.cuda.max_memory_allocated minus memory_allocated at start"
        if _cpu_peak_resettable():
            return ("in-process, per timed rep: peak RSS (VmHWM, reset through /proc/self/clear_refs after "
                    "gc + malloc_trim) minus RSS at start; max over reps")
        return "unavailable (no resettable peak RSS on this OS)"

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
                _LIBC.malloc_trim(0)
            self.ok = _cpu_peak_resettable()
            self.base = _rss_kib("VmRSS") if self.ok else 0
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.ok:
            self.mib = (_rss_kib("VmHWM") - self.base) / 1024
        return False


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def summarize(seconds: list[float], peaks: list[float | None], tokens: int, examples: int) -> dict:
    med = statistics.median(seconds)
    mem = [p for p in peaks if p is not None]
    return {"examples": examples, "tokens": tokens, "tokens_per_s": tokens / med, "seconds_median": med,
            "seconds": seconds, "peak_mem_mib": max(mem) if mem else None}


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(((x - ref).abs() / ref.abs().clamp(min=1e-30)).max())


def machine_info(device: str) -> dict:
    import transformers

    cpu = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = found.group(1).strip() if found else None
    info = {"cpu_count": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # busy CPU: slow runs
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu}
    try:
        import opacus
        info["opacus"] = opacus.__version__
    except ImportError:
        info["opacus"] = None
    return info
