"""Probe engine benchmark: per-example gradient norms vs one training step, a naive loop and Opacus.

    python benchmarks/probe_bench.py [--model PATH] [--device auto|cpu|cuda] [--dtype fp32|bf16]
        [--examples 16] [--seq-len 256] [--mixed] [--batch-tokens 4096] [--reps 3] [--ref-examples 2]
        [--opacus-examples ref|all] [--skip naive opacus]

Prints one JSON object on stdout; progress goes to stderr.

Methodology. One model (default: the embedded SmolLM2-135M-Instruct, fp32 weights), one process, one set
of synthetic examples: random token ids with a fixed seed, the loss on the second half of each sequence
(like an assistant reply), optionally mixed lengths. Examples are packed exactly as the probe stage packs
them (curate.batching.token_batches + right_pad, right padding, `--batch-tokens` padded tokens a batch).
The methods run alternately — train_step, probe, naive, opacus, train_step, probe, ... — so that drift in
the machine's load hits them all alike: one warm-up round, then `--reps` timed rounds; we report the
median. Tokens are real (unpadded) tokens.

  train_step  what "the cost of one training step" means: every parameter requires grad, forward +
              backward of the token-mean loss over the same batches (weight grads accumulate; they are
              dropped between reps, no optimizer). Same loss code as the probe (curate.gradients.token_nll,
              the LM head on target positions only), so the ratio isolates the per-example machinery.
  probe       curate.gradients.probe_batch on the same padded batches, parameters frozen.
  naive       one backward per example, alone and unpadded; only the probed weights require grad; each
              module's weight.grad norm is read. Always fp32: it is the reference for exactness. Norms are
              reduced in fp64: torch's fp32 Tensor.norm() on CPU drifts by 1e-5..1e-4 on a 1M-entry
              matrix, which would swamp the error being measured.
  opacus      opacus.GradSampleModule (hooks mode, loss_reduction="sum"), only the probed linear weights
              trainable, per-sample gradients (B, d_out, d_in) reduced to the same Frobenius norms.

naive and opacus are slow (opacus holds B x 106M floats of per-sample gradients for SmolLM2), so they run
on the first `--ref-examples` examples only (opacus on every example, in the probe's batches, with
`--opacus-examples all`); every method reports its own tokens/s, and ratios compare tokens/s (> 1: probe
faster). The probe also runs on those examples alone (methods.probe_ref), so that memory and, in a second
set of ratios, speed compare like with like. Which ratio is the fair one differs: naive is one example
per backward whatever the count, so its tokens/s does not depend on how many examples it sees and the
probe is compared at its own batches (ratios_tokens_per_s); Opacus batches as the probe does, so it is
compared on the same batches (ratios_tokens_per_s_same_examples). Exactness: the max relative error,
over those examples and all modules, of the probe's (and opacus's) norms against naive fp32 norms; with
--dtype bf16, probe, train_step and opacus run under bf16 autocast and the error is against the fp32
reference. On CPU the warm-up round uses two examples (it only pays first-call costs); on CUDA it is a
full round. Peak memory is measured in-process around each timed rep, so no method runs extra times for
it (see "memory_method" in the output and _bench_utils.PeakMemory; on CPU it agrees with a fresh process
measuring the method alone; a side effect: `/usr/bin/time -v` then reports only the peak since the last
reset). On a CPU that other jobs share, torch's OpenMP threads can slow down several-fold: compare
`--threads 1`, and see machine.loadavg_1m in the output."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench_utils import (Batch, PeakMemory, autocast, machine_info, make_examples, max_rel_err,
                                     pack, summarize, timed)
from curate.gradients import probe_batch, token_nll
from curate.roles import role_map

METHODS = ("train_step", "probe", "naive", "opacus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local HF folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (weights fp32)")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--mixed", action="store_true", help="lengths uniform in [seq_len/2, seq_len]")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch")
    p.add_argument("--reps", type=int, default=3, help="timed reps after one warm-up")
    p.add_argument("--ref-examples", type=int, default=2, help="examples for naive and opacus (0: all)")
    p.add_argument("--opacus-examples", default="ref", choices=["ref", "all"],
                   help="opacus on naive's --ref-examples examples, or on all of them in the probe's batches")
    p.add_argument("--skip", nargs="*", default=[], choices=["naive", "opacus"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.reps < 1 or args.examples < 1:
        p.error("--reps and --examples must be at least 1")
    return args


@dataclass
class Work:
    rows: list[int]
    batches: list[Batch]

    @property
    def tokens(self) -> int:
        return sum(b.real_tokens for b in self.batches)


def train_step(model, batches: list[Batch], amp) -> None:
    model.requires_grad_(True)
    try:
        for b in batches:
            with amp():
                nll = token_nll(model, b.input_ids, b.attention, b.loss_mask)
            counts = b.loss_mask[:, 1:].sum(dim=1)
            ((nll * counts).sum() / counts.sum()).backward()  # token mean over the batch
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def probe(model, modules, batches: list[Batch], n: int, amp_dtype) -> torch.Tensor:
    sq = torch.zeros(n, len(modules.entries), dtype=torch.float64)
    for b in batches:
        res = probe_batch(model, modules, b.input_ids, b.attention, b.loss_mask, amp_dtype)
        sq[b.rows] = res.sq_norms.double().cpu()
    return sq.sqrt()


def _trainable(weights: list[torch.Tensor], on: bool) -> None:
    for w in weights:
        w.grad = None
        w.requires_grad_(on)


def entry_weights(modules) -> list[torch.Tensor]:
    """One whole weight per grad_norms entry (the references below measure whole matrices: no fused blocks)."""
    weights = [None] * len(modules.entries)
    for site in modules.sites:
        if len(site.blocks) != 1 or site.blocks[0][1] is not None or site.param.ndim != 2:
            raise ValueError(f"{site.param.shape} weight split into blocks: naive/opacus measure whole matrices; "
                             "benchmark a model with one matrix per role (Llama family)")
        weights[site.blocks[0][0]] = site.param
    return weights


def naive(model, modules, examples, rows: list[int], n: int, device: str) -> torch.Tensor:
    weights = entry_weights(modules)
    norms = torch.zeros(n, len(weights), dtype=torch.float64)
    _trainable(weights, True)
    try:
        for r in rows:
            ids, mask = examples[r]
            x = torch.tensor([ids], device=device)
            token_nll(model, x, torch.ones_like(x), torch.tensor([mask], device=device)).sum().backward()
            norms[r] = torch.stack([w.grad.double().norm() for w in weights]).cpu()  # fp32 .norm() drifts ~1e-4
            for w in weights:
                w.grad = None
    finally:
        _trainable(weights, False)
    return norms


def opacus(model, modules, batches: list[Batch], n: int, amp) -> torch.Tensor:
    from opacus import GradSampleModule

    weights = entry_weights(modules)
    norms = torch.zeros(n, len(weights), dtype=torch.float64)
    _trainable(weights, True)
    model.train()  # Opacus only captures activations of modules in training mode (Llama: no dropout)
    gsm = None
    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        with warnings.catch_warnings():  # layer 0's inputs need no grad: Opacus's full backward hooks warn
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for b in batches:
                with amp():
                    nll = token_nll(model, b.input_ids, b.attention, b.loss_mask)
                nll.sum().backward()
                per_sample = [w.grad_sample.flatten(1).double().norm(dim=1) for w in weights]
                norms[b.rows] = torch.stack(per_sample, dim=1).cpu()
                for w in weights:
                    w.grad_sample, w.grad = None, None
    finally:
        if gsm is not None:
            gsm.remove_hooks()
        for w in weights:
            w.grad_sample = None
        model.eval()
        _trainable(weights, False)
    return norms


def run_benchmark(model, args: argparse.Namespace) -> dict:
    """Time every method on `model` (already on its device) and return the JSON-ready result."""
    device = next(model.parameters()).device.type
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    amp = lambda: autocast(device, amp_dtype)  # noqa: E731
    modules = role_map(model)
    n = args.examples
    examples = make_examples(n, args.seq_len, model.config.vocab_size, args.mixed, args.seed)
    k = min(args.ref_examples or n, n)
    full = Work(list(range(n)), pack(examples, list(range(n)), args.batch_tokens, device))
    ref = Work(list(range(k)), pack(examples, list(range(k)), args.batch_tokens, device))
    warm = Work(list(range(min(2, n))), pack(examples, list(range(min(2, n))), args.batch_tokens, device))
    calls = {
        "train_step": (full, lambda w: train_step(model, w.batches, amp)),
        "probe": (full, lambda w: probe(model, modules, w.batches, n, amp_dtype)),
        "naive": (ref, lambda w: naive(model, modules, examples, w.rows, n, device)),
        "opacus": (full if args.opacus_examples == "all" else ref, lambda w: opacus(model, modules, w.batches, n, amp)),
        "probe_ref": (ref, lambda w: probe(model, modules, w.batches, n, amp_dtype)),
    }
    # probe_ref: the probe on naive's and opacus's examples, for like-for-like memory (and speed) ratios
    opacus_full = args.opacus_examples == "all" or "opacus" in args.skip
    same = "probe" if k == n or ("naive" in args.skip and opacus_full) else "probe_ref"
    active = [m for m in METHODS if m not in args.skip] + ([same] if same != "probe" else [])
    seconds, peaks, outputs, errors = {m: [] for m in active}, {m: [] for m in active}, {}, {}
    for rep in range(-1, args.reps):
        for m in list(active):
            work, fn = calls[m]
            work = warm if rep < 0 and device == "cpu" else work  # CPU: first-call costs only; CUDA: full
            box = {}
            try:
                with PeakMemory(device) as mem:
                    sec = timed(lambda: box.update(out=fn(work)), device)
            except Exception as e:  # opacus may not support a model; the others must work
                if m != "opacus":
                    raise
                errors[m] = f"{type(e).__name__}: {e}"
                active.remove(m)
                print(f"[bench] opacus failed: {errors[m]}", file=sys.stderr)
                continue
            if rep >= 0:
                seconds[m].append(sec)
                peaks[m].append(mem.mib)
                outputs[m] = box["out"]
            print(f"[bench] {'warm-up' if rep < 0 else f'rep {rep + 1}/{args.reps}'} {m}: {sec:.2f}s "
                  f"{work.tokens / sec:.0f} tok/s, peak {mem.mib or 0:.0f} MiB", file=sys.stderr)

    methods = {m: summarize(seconds[m], peaks[m], calls[m][0].tokens, len(calls[m][0].rows)) for m in active}
    methods.update({m: {"error": e} for m, e in errors.items()})
    methods.update({m: {"skipped": True} for m in args.skip})

    def ratio(key: str, m: str, mine: str = "probe") -> float | None:  # the probe's stat over m's
        a, b = methods[mine].get(key), methods[m].get(key)
        return a / b if a is not None and b else None

    others = [m for m in METHODS if m != "probe"]
    # the probe run on m's examples
    like = {m: "probe" if m == "train_step" or (m == "opacus" and opacus_full) else same for m in others}
    exact = {"reference": "naive: fp32 weight.grad of each example alone (unpadded), norms reduced in fp64",
             "examples": k, "probe_dtype": args.dtype}
    if "naive" in outputs:
        for m in ("probe", "opacus"):
            exact[f"{m}_vs_naive_max_rel_err"] = max_rel_err(outputs[m][:k], outputs["naive"][:k]) \
                if m in outputs else None
    lengths = [len(e[0]) for e in examples]
    return {
        "benchmark": "probe_bench",
        "config": {**vars(args), "device": device, "model_class": type(model).__name__,
                   "params": sum(p.numel() for p in model.parameters()), "probed_modules": len(modules.entries),
                   "real_tokens": sum(lengths), "padded_tokens": sum(b.input_ids.numel() for b in full.batches),
                   "batches": [list(b.input_ids.shape) for b in full.batches],
                   "warmup": f"one round on {len(warm.rows)} examples" if device == "cpu" else "one full round",
                   "ref_examples": k},
        "machine": machine_info(device),
        "memory_method": PeakMemory.method(device),
        "methods": methods,
        "ratios_tokens_per_s": {f"probe/{m}": ratio("tokens_per_s", m) for m in others},
        "ratios_tokens_per_s_same_examples": {f"probe/{m}": ratio("tokens_per_s", m, like[m]) for m in others},
        "ratios_peak_mem": {f"probe/{m}": ratio("peak_mem_mib", m, like[m]) for m in others},
        "ratios_note": ("> 1: the probe is faster / uses more memory. ratios_tokens_per_s: the probe on all "
                        "examples in its batches; the _same_examples and peak_mem ratios compare it with naive "
                        f"and opacus on their examples (naive: {k}; opacus: "
                        f"{'all, in the same batches' if opacus_full else k}; methods.{same})"),
        "examples_per_method": {m: len(calls[m][0].rows) for m in active},
        "exactness": exact,
    }


def main(argv: list[str] | None = None) -> int:
    from curate import models

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    ref = models.resolve(args.model)
    print(f"[bench] loading {ref.name} on {device}", file=sys.stderr)
    result = run_benchmark(models.load_model(ref, device), args)
    result["config"]["model"] = ref.name
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
