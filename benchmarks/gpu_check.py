"""The device check: the probe on a GPU (or, small, on CPU) against a training step, a naive loop and Opacus.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--budget-s 420] [--out DIR] [--tokenizer DIR]
        [--sections ...]

Prints one JSON object on stdout (progress on stderr) and, with --out, writes it to DIR/gpu_check.json
after every section, so a run stopped early still leaves what it measured. Needs only torch,
transformers, pyarrow and numpy (opacus, dask and jsonschema where present): models are built with
random weights from the configs of real models (SHAPES), so no weights travel.

Sections, in order; each is skipped (with the reason) when the time budget left is too small for it:
  ceilings      bf16 matmul TFLOP/s and device copy GB/s on this device: the roofline the others meet.
  norm_step     curate.gradients.per_example_block_sq_norms alone on random bf16 activations/gradients of
                each module shape: relative error against fp64 on the same inputs, and the time of the Gram
                and the product form at T = 128, 1024, 4096, with the form the cost model picks.
  exactness     the probe against naive autograd (one backward per example, fp32 weight.grad, norms in
                fp64) on each shape: fp32 probe (exactness) and bf16 probe (precision).
  speed         benchmarks/probe_bench.py's methods (train_step, probe, naive, opacus) under bf16 autocast
                at T = 1024 and 4096: tokens/s, peak memory, ratios.
  small_t       the same at T = 128 on the smallest shape: per-module overhead.
  profile       one 1.5B-shape batch: the probe (strict deterministic algorithms), the same in warn-only
                mode and without them, the same forward/backward without hooks, a training step, and the probe's top kernels.
  end_to_end    `curate prism --device cuda --dtype bf16` on data/demo_quick with a random-weight model
                of the smallest shape, twice in process and once with --workers 1 (when dask is
                installed), comparing the routed bytes.

--device cpu runs the same code on tiny shapes (tests/test_gpu_check.py runs it in CI)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `curate` importable
    sys.path.insert(0, str(REPO))

from benchmarks import probe_bench  # noqa: E402
from benchmarks._bench_utils import machine_info, timed  # noqa: E402
from curate import determinism, gradients  # noqa: E402

# Real models' shapes (from their published config.json); weights are random.
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=False, rope_theta=500000.0)),
}
# --device cpu: the same families, tiny
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
SECTIONS = ("ceilings", "norm_step", "exactness", "speed", "small_t", "end_to_end", "profile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--budget-s", type=float, default=None, help="stop starting sections after this (default: "
                   "cuda 420, cpu 600)")
    p.add_argument("--out", default=None, help="folder for gpu_check.json, rewritten after every section")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder with a chat template for end_to_end "
                   "(default: the embedded SmolLM2's)")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 420.0 if args.device == "cuda" else 600.0
    return args


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def build(name: str, device: str, **override):
    """A random-weight model of SHAPES[name] (tiny on CPU), fp32 weights as curate loads them, frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family, dims = SHAPES[name]
    dims = {**dims, **(TINY if device == "cpu" else {}), **override}
    config = AutoConfig.for_model(family, **dims, max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cuda_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of fn() by CUDA events, after one warm-up call (CPU: perf_counter)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(timed(fn, "cpu") * 1e3)
    return sorted(times)[len(times) // 2]


def ceilings(args) -> dict:
    n = 8192 if args.device == "cuda" else 512
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    ms = cuda_ms(lambda: a @ b, reps=10)
    x = torch.randn(2**28 if args.device == "cuda" else 2**22, device=args.device)  # 1 GiB on CUDA
    y = torch.empty_like(x)
    copy_ms = cuda_ms(lambda: y.copy_(x), reps=10)
    return {"matmul": f"{n}x{n}x{n} {str(dtype).split('.')[-1]}", "matmul_tflops": 2 * n**3 / ms / 1e9,
            "copy_gb_per_s": 2 * x.numel() * 4 / copy_ms / 1e6, "copy_note": "bytes read + written"}


def module_shapes(name: str, device: str) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of q, k/v, o, gate/up and down for SHAPES[name]."""
    dims = {**SHAPES[name][1], **TINY} if device == "cpu" else SHAPES[name][1]
    h, f = dims["hidden_size"], dims["intermediate_size"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    return {"q_o": (h, h), "k_v": (h, kv), "gate_up": (h, f), "down": (f, h)}


def norm_step(args) -> dict:
    dev = args.device
    low = dev == "cuda"
    dtype = torch.bfloat16 if low else torch.float32
    ts = (128, 1024, 4096) if dev == "cuda" else (16, 64)
    names = ("qwen2.5-1.5b", "llama-3.1-8b") if dev == "cuda" else ("qwen2.5-1.5b",)
    rows, worst = [], {"norms_vs_fp64_same_inputs": 0.0}
    gen = torch.Generator(device=dev).manual_seed(0)
    for name in names:
        for module, (d_in, d_out) in module_shapes(name, dev).items():
            for t in ts:
                b = min(16, max(1, 8192 // t)) if dev == "cuda" else 2
                a = torch.randn(b, t, d_in, device=dev, generator=gen, dtype=dtype)
                g = torch.randn(b, t, d_out, device=dev, generator=gen, dtype=dtype) * 1e-3
                got = gradients.per_example_block_sq_norms(a, g, [None])[:, 0].double()
                ref = torch.stack([(g[i].double().T @ a[i].double()).square().sum() for i in range(b)])
                err = float(((got - ref).abs() / ref).max())
                worst["norms_vs_fp64_same_inputs"] = max(worst["norms_vs_fp64_same_inputs"], err)
                ms = {form: cuda_ms(partial(gradients.per_example_block_sq_norms, a, g, [None], form))
                      for form in ("gram", "product")}
                chosen = "gram" if gradients.gram_is_cheaper(t, d_in, d_out, 1, gradients._balance(a.device, low)) \
                    else "product"
                faster = min(ms, key=ms.get)
                rows.append({"shape": name, "module": module, "d_in": d_in, "d_out": d_out, "T": t, "B": b,
                             "ms_gram": round(ms["gram"], 4), "ms_product": round(ms["product"], 4),
                             "chosen": chosen, "faster": faster,
                             "chosen_over_best": round(ms[chosen] / ms[faster], 3), "max_rel_err_vs_fp64": err})
                del a, g
            free(dev)
    return {"dtype": str(dtype).split(".")[-1], "max_rel_err": worst, "forms": rows,
            "choice_within_10pct_of_best": sum(r["chosen_over_best"] <= 1.1 for r in rows), "cases": len(rows),
            "worst_choice_over_best": max(r["chosen_over_best"] for r in rows)}


def bench_args(**kw) -> argparse.Namespace:
    args = probe_bench.parse_args([])
    vars(args).update(kw)
    return args


def exactness(args) -> dict:
    dev = args.device
    names = ("smollm2-135m", "qwen2.5-1.5b")  # the 8B shape's speed cases report its bf16 error
    t = 512 if dev == "cuda" else 48
    out = {}
    for name in names:
        model = build(name, dev)
        res = {}
        for dtype in ("fp32", "bf16"):
            r = probe_bench.run_benchmark(model, bench_args(dtype=dtype, examples=2, seq_len=t, mixed=True, reps=1,
                                                            ref_examples=0, skip=["opacus"], seed=1,
                                                            batch_tokens=4 * t))
            res[dtype] = r["exactness"]["probe_vs_naive_max_rel_err"]
        out[name] = {"T": t, "probe_fp32_vs_naive_fp32": res["fp32"], "probe_bf16_vs_naive_fp32": res["bf16"]}
        del model
        free(dev)
    return {"reference": "naive: one backward per example, fp32 weight.grad, norms in fp64; max over examples "
                         "and every probed module of |probe - naive| / naive", "models": out}


def speed_case(name: str, t: int, args, skip: list[str], examples: int | None = None, reps: int = 3) -> dict:
    dev = args.device
    big = name == "llama-3.1-8b"
    batch_tokens = (4096 if big else 8192) if dev == "cuda" else 4 * t
    n = examples or (max(2, 16384 // t) if dev == "cuda" else 3)
    model = build(name, dev)
    try:
        r = probe_bench.run_benchmark(model, bench_args(dtype="bf16", examples=n, seq_len=t, mixed=False,
                                                        reps=reps if dev == "cuda" else 1, ref_examples=2,
                                                        opacus_examples="all", skip=skip,
                                                        batch_tokens=batch_tokens))
    finally:
        del model
        free(dev)
    keep = ("config", "methods", "ratios_tokens_per_s", "ratios_tokens_per_s_same_examples", "ratios_peak_mem",
            "exactness")
    r = {k: r[k] for k in keep}
    r["config"] = {k: r["config"][k] for k in ("seq_len", "examples", "batch_tokens", "params", "probed_modules",
                                               "real_tokens", "batches", "ref_examples", "dtype")}
    return r


def speed(args, deadline: float) -> dict:
    dev = args.device
    has_opacus = importlib.util.find_spec("opacus") is not None
    # the 1.5B shape first: the targets are stated for it
    cases = [("qwen2.5-1.5b", 1024), ("qwen2.5-1.5b", 4096), ("smollm2-135m", 1024), ("llama-3.1-8b", 1024),
             ("smollm2-135m", 4096), ("llama-3.1-8b", 4096)] if dev == "cuda" else [("qwen2.5-1.5b", 64)]
    out = {}
    for name, t in cases:
        key = f"{name}@T={t}"
        if time.monotonic() > deadline:
            out[key] = {"skipped": "time budget spent"}
            continue
        # Opacus holds every example's full gradient: B x 8B floats do not fit beside the 8B model
        skip = [] if has_opacus and name != "llama-3.1-8b" else ["opacus"]
        if name == "llama-3.1-8b" and t > 1024:  # fp32 naive activations of 4096 tokens beside 64 GB: out of memory
            skip.append("naive")
        log(f"speed {key}")
        started = time.monotonic()
        try:
            out[key] = speed_case(name, t, args, skip)
        except Exception as e:  # one shape failing (e.g. out of memory) must not hide the others
            out[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            free(dev)
        out[key]["wall_s"] = round(time.monotonic() - started, 1)
    return out


def profile(args) -> dict:
    """Where the probe's time goes, on one batch of the 1.5B shape at T = 1024 (tiny on CPU): the probe
    (strict deterministic algorithms), the same in warn-only mode and without deterministic algorithms, the same forward and backward with no hooks (weights
    frozen, only the input embeddings needing grad: the probe minus its norm step) and a training step,
    each timed alone; then the probe's top kernels by device time under torch.profiler."""
    dev = args.device
    model = build("qwen2.5-1.5b", dev)
    try:
        return _profile(model, dev)
    finally:
        del model
        free(dev)


def _profile(model, dev: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks._bench_utils import make_examples, pack
    from curate.roles import role_map

    t = 1024 if dev == "cuda" else 32
    rmap = role_map(model)
    n = max(1, 8192 // t) if dev == "cuda" else 2
    (batch,) = pack(make_examples(n, t, model.config.vocab_size, False, 0), list(range(n)), n * t, dev)
    amp = torch.bfloat16

    def probe():
        gradients.probe_batch(model, rmap, batch.input_ids, batch.attention, batch.loss_mask, amp)

    def probe_with(types: tuple, strict: bool):  # one probe attempt, deterministic algorithms on `types` only
        def run():
            real, determinism.DEVICE_TYPES = determinism.DEVICE_TYPES, types
            try:
                gradients._probe(model, rmap, batch.input_ids, batch.attention, batch.loss_mask, amp, strict=strict)
            finally:
                determinism.DEVICE_TYPES = real
        return run

    def frozen_backward():
        embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        with torch.autocast(dev, dtype=amp):
            loss = gradients.token_nll(model, batch.input_ids, batch.attention, batch.loss_mask, inputs_embeds=embeds)
        loss.sum().backward()

    def train():
        probe_bench.train_step(model, [batch], lambda: torch.autocast(dev, dtype=amp))

    timed_fns = {"probe": probe, "probe_warn_only": probe_with(determinism.DEVICE_TYPES, False),
                 "probe_nondeterministic": probe_with((), True), "frozen_backward": frozen_backward,
                 "train_step": train}
    ms = {name: cuda_ms(fn, reps=5) for name, fn in timed_fns.items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        probe()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "device_time_total" if dev == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0) or 0, reverse=True)
    top = [{"name": e.key[:90], "calls": e.count, "ms": round((getattr(e, key, 0) or 0) / 1e3, 3)}
           for e in events[:20]]
    launches = sum(e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    return {"shape": "qwen2.5-1.5b", "T": t, "B": n, "tokens": n * t, "ms": {k: round(v, 3) for k, v in ms.items()},
            "probe_minus_frozen_backward_ms": round(ms["probe"] - ms["frozen_backward"], 3),
            # None where deterministic algorithms are never turned on (CPU): the three probe timings are then
            # the same computation
            "strict_deterministic": getattr(model, "_curate_not_deterministic", None) is None
            if dev in determinism.DEVICE_TYPES else None,
            "kernel_launches": launches, "top_ops_by_device_time": top}


def small_t(args) -> dict:
    t = 128 if args.device == "cuda" else 16
    return speed_case("smollm2-135m", t, args, ["naive", "opacus"], examples=64 if args.device == "cuda" else 4)


def _model_folder(args, where: Path) -> Path:
    """A random-weight smallest-shape model saved with a chat-template tokenizer, as a user's HF folder."""
    from transformers import AutoTokenizer

    from curate import models

    tok = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
           else models.load_tokenizer(models.resolve(None)))
    model = build("smollm2-135m", args.device, vocab_size=len(tok))  # the real model's own vocabulary
    folder = where / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    free(args.device)
    return folder


def _routed_digest(folder: Path) -> str:
    """sha256 over the routed shards' bytes in name order: equal across executors when the output is."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*.arrow") if "quarantine" not in p.parts):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def end_to_end(args, deadline: float) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _model_folder(args, Path(tmp))
        runs = {"workers_0": [], "workers_0_again": []}  # the same run twice: are CUDA outputs reproducible?
        if importlib.util.find_spec("distributed") is not None:
            runs["workers_1"] = ["--workers", "1"]
        else:
            out["workers_1"] = {"skipped": "dask.distributed is not installed"}
        for key, extra in runs.items():
            left = deadline - time.monotonic()
            if left < 30:
                out[key] = {"skipped": "time budget spent"}
                continue
            dest = Path(tmp) / key
            cmd = [sys.executable, "-m", "curate.cli", "prism", "--input", str(REPO / "data" / "demo_quick"),
                   "--out", str(dest), "--model", str(folder), "--device", args.device, "--dtype", "bf16",
                   "--limit", "16", "--quiet", *extra]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            started = time.monotonic()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=max(30, left))
                rc, tail = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as e:
                rc, tail = "timeout", str(e)[-3000:]
            res = {"rc": rc, "wall_s": round(time.monotonic() - started, 1), "command": " ".join(cmd[2:]),
                   # curate.gradients warns once when a model's probe cannot run strict deterministic algorithms;
                   # None where they are never turned on (CPU)
                   "strict_deterministic": "without strict deterministic algorithms" not in tail
                   if args.device in determinism.DEVICE_TYPES else None}
            manifest = dest / "manifest.json"
            if rc == 0 and manifest.exists():
                m = json.loads(manifest.read_text())
                res["rows"] = m.get("counts") or m.get("rows")
                res["probe_device"] = m.get("config", {}).get("device")
                res["timings_s"] = m.get("timings_s")
                res["routed_sha256"] = _routed_digest(dest)
            else:
                res["output_tail"] = tail[-3000:]
            out[key] = res
    digests = {k: v.get("routed_sha256") for k, v in out.items() if isinstance(v, dict)}
    if digests.get("workers_0"):
        out["same_bytes_on_rerun"] = digests["workers_0"] == digests.get("workers_0_again")
        out["same_bytes_on_a_worker"] = digests["workers_0"] == digests.get("workers_1") if "workers_1" in digests \
            else None
    return out


def run(args) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_s
    result = {"benchmark": "gpu_check", "device": args.device, "machine": machine_info(args.device),
              "budget_s": args.budget_s, "sections": {}}
    result["machine"]["gpu_memory_gib"] = (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                                           if args.device == "cuda" else None)
    plan = {"ceilings": lambda: ceilings(args), "norm_step": lambda: norm_step(args),
            "exactness": lambda: exactness(args), "end_to_end": lambda: end_to_end(args, deadline),
            "speed": lambda: speed(args, deadline), "small_t": lambda: small_t(args), "profile": lambda: profile(args)}
    # the cheap, decisive sections first; the 8B speed cases last inside `speed`
    order = ("ceilings", "norm_step", "exactness", "small_t", "end_to_end", "profile", "speed")
    for name in order:
        if name not in args.sections:
            continue
        if time.monotonic() > deadline:
            result["sections"][name] = {"skipped": "time budget spent"}
            continue
        log(f"section {name} ({time.monotonic() - started:.0f} s in)")
        t = time.monotonic()
        try:
            result["sections"][name] = plan[name]()
        except Exception as e:
            result["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                        "traceback": traceback.format_exc()[-3000:]}
            free(args.device)
        result["sections"][name]["section_s"] = round(time.monotonic() - t, 1)
        result["wall_s"] = round(time.monotonic() - started, 1)
        if args.out:
            write(result, Path(args.out))
    result["summary"] = summary(result)
    return result


def summary(result: dict) -> dict:
    """The figures the targets are stated in (None where a section did not run)."""
    s, out = result["sections"], {}
    for key, case in (s.get("speed") or {}).items():
        if isinstance(case, dict) and "ratios_tokens_per_s" in case:
            r, m = case["ratios_tokens_per_s"], case["ratios_peak_mem"]
            out[key] = {"probe_tok_s": round(case["methods"]["probe"]["tokens_per_s"]),
                        "probe/train_step": r.get("probe/train_step"),
                        # naive is one example per backward: its tokens/s does not depend on how many it
                        # sees, so the probe is compared at its own batches (and, below, held to naive's)
                        "probe/naive": r.get("probe/naive"),
                        "probe/naive, probe on naive's examples alone":
                            case["ratios_tokens_per_s_same_examples"].get("probe/naive"),
                        # Opacus batches as the probe does: the same examples in the same batches
                        "probe/opacus": case["ratios_tokens_per_s_same_examples"].get("probe/opacus"),
                        "peak_mem probe/train_step": m.get("probe/train_step"),
                        "bf16_vs_fp32_naive_max_rel_err": case["exactness"].get("probe_vs_naive_max_rel_err")}
    return out


def finite(obj):
    """obj with every NaN or infinite float as None: strict JSON (no bare NaN tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(result: dict) -> str:
    return json.dumps(finite(result), indent=1, default=str, allow_nan=False)


def write(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "gpu_check.json.tmp"
    tmp.write_text(dumps(result))
    tmp.replace(folder / "gpu_check.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    # as curate.models.load_model does before the first cuBLAS call, so the probe measured here is the
    # one curate runs (strict deterministic algorithms need it; see curate.determinism)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    result = run(args)
    if args.out:
        write(result, Path(args.out))
    print(dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
