"""Scale benchmark: ingest + route throughput and peak memory on synthetic records.

    python benchmarks/scale_bench.py [--sizes 20000 200000] [--shard-size 4096] [--modules 210]

Prints one JSON object on stdout (progress on stderr).

What is measured, per size N, each in a fresh Python process (so peak RSS belongs to that size alone):
  ingest  curate.engine.shards.run_ingest on one JSONL file of N synthetic records: read, parse, detect the
          format, normalise, content-hash ids, drop duplicates, quarantine bad records, write Arrow
          shards and the quarantine file. Records: 60% prompt/completion (GSM8K-like, "#### N" answers),
          35% OpenAI messages (3-5 turns), 1% exact duplicates, 4% bad (truncated JSON, empty content).
  route   curate.jobs.prism.write_routed: corpus threshold over every shard's scores (gini, cv, kurtosis,
          magnitude, random), then per shard the join of records + token + probe columns, the route,
          sft/rl Arrow shards, the quarantine file (streamed) and manifest.json.
Not measured: tokenize and the gradient probe (model-bound; see probe_bench.py). Their cache shards are
written between the two timed phases with synthetic values (`--modules` gradient norms per record) in
the same layout the pipeline uses, so route reads exactly what it reads after a real run: that
includes the concentration metrics (gini, cv, kurtosis, magnitude) the probe stage stores beside its
norms.

Ingest starts its JSON-lines parse helpers (one per CPU) when the input has 12 MiB or more: the 200k
input (66 MB) uses them, the 20k one (6.6 MB) is parsed in the calling process. `parse_helpers` says
which; `helper_peak_rss_mb` is the largest helper's own peak RSS (0 without helpers). Each size runs
`--repeat` times, each in a fresh process; the median run is reported with every run's records/s, since
a shared 2-core machine varies by ±20% from run to run. `calibration_us_per_record` (a fixed
single-process parse, measured just before each run) shows how fast the machine was at the time.

Libraries a real run has loaded by route time (torch, transformers, datasets: their versions go into
the manifest) are imported before the baseline. records/s = N / (ingest_s + route_s). peak_rss_mb is the process's high-water mark (ru_maxrss), measured
after the run; baseline_rss_mb is the same process after imports, before any work. The memory claim is
that peak - baseline does not grow with N: both phases hold one shard (plus ingest's set of seen ids,
about 140 bytes per unique record)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def synthetic_jsonl(path: Path, n: int, seed: int = 0) -> dict:
    """N lines of synthetic input; returns how many of each kind were written."""
    rng = random.Random(seed)
    words = "the a of to and in is it that for on with as was by be at this from or an which".split()
    kinds = {"prompt_completion": 0, "messages": 0, "duplicate": 0, "bad": 0}
    previous = None
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            u = rng.random()
            text = " ".join(rng.choices(words, k=rng.randint(8, 40)))
            if u < 0.01 and previous:
                line, kind = previous, "duplicate"
            elif u < 0.03:
                line, kind = json.dumps({"prompt": f"Q{i}: {text}", "completion": ""}), "bad"
            elif u < 0.05:
                line, kind = json.dumps({"prompt": f"Q{i}: {text}", "completion": text})[:-7], "bad"
            elif u < 0.65:
                a, b = rng.randint(1, 999), rng.randint(1, 999)
                line = json.dumps({"prompt": f"Q{i}: what is {a} + {b}? {text}",
                                   "completion": f"{a} plus {b} is {a + b}. {text}\n#### {a + b}"})
                kind = "prompt_completion"
            else:
                turns = [{"role": "system", "content": "You are helpful."}] if rng.random() < 0.3 else []
                for t in range(rng.randint(1, 2)):
                    turns += [{"role": "user", "content": f"Q{i}.{t}: {text}"},
                              {"role": "assistant", "content": " ".join(rng.choices(words, k=30))}]
                line, kind = json.dumps({"messages": turns, "reward": rng.random() < 0.5}), "messages"
            f.write(line + "\n")
            kinds[kind] += 1
            previous = line if kind != "bad" else previous
    return kinds


def synthetic_signal_shards(ing: dict, work: Path, n_modules: int) -> tuple[list, list]:
    """Token and probe cache shards (work/tokenize, work/probe) with synthetic values, one per ingest shard."""
    import numpy as np
    import pyarrow as pa

    from curate.io.atomic import write_arrow
    from curate.corpus import route

    rng = np.random.default_rng(0)
    tok, prb = [], []
    for i, shard in enumerate(ing["shards"]):
        n = shard["rows"]
        n_tokens = rng.integers(32, 2048, n)
        tokens = pa.table({"n_tokens": n_tokens, "n_loss_tokens": n_tokens // 2,
                           "truncated": np.zeros(n, bool), "token_error": pa.nulls(n, pa.string())})
        norms = rng.gamma(2.0, 1.0, (n, n_modules)).astype(np.float32)
        grad_norms = pa.FixedSizeListArray.from_arrays(norms.ravel(), n_modules).cast(pa.list_(pa.float32()))
        probe = pa.table({"probe_loss": rng.random(n, np.float32), "grad_norms": grad_norms,
                          "grad_norm_total": np.linalg.norm(norms, axis=1).astype(np.float32),
                          **route.norm_metric_columns(grad_norms)})  # as the probe stage writes them
        for folder, table, out in (("tokenize", tokens, tok), ("probe", probe, prb)):
            path = work / folder / f"part-{i:05d}.arrow"
            out.append({"path": str(path), "sha256": write_arrow(path, table), "rows": n})
    return tok, prb


HELPER_PEAKS_MB: list[float] = []


def record_helper_peaks() -> None:
    """Each parse helper's peak RSS (VmHWM, Linux), read just before it is closed. (ru_maxrss of
    children would report the parent's size at fork instead.)"""
    from curate.ingest import pool as ingest_pool

    close = ingest_pool.Helper.close

    def close_and_record(helper, kill: bool = False) -> None:
        try:
            status = Path(f"/proc/{helper.proc.pid}/status").read_text()
            HELPER_PEAKS_MB.append(int(status.split("VmHWM:")[1].split()[0]) / 1024)
        except (OSError, IndexError, ValueError):
            pass
        close(helper, kill)

    ingest_pool.Helper.close = close_and_record


def calibration_us(tmp: Path) -> float:
    """This machine's speed right now: the best of 5 single-process parses of the same 5,000 synthetic
    records, in µs a record. Throughput moves with it; compare runs by it."""
    from curate.ingest.chunks import normalize_lines

    synthetic_jsonl(tmp / "calibration.jsonl", 5000, seed=1)
    data = (tmp / "calibration.jsonl").read_bytes()
    best = min(_timed(normalize_lines, "calibration", 0, data, "auto") for _ in range(5))
    return round(best / 5000 * 1e6, 2)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_size(n: int, shard_size: int, n_modules: int) -> dict:
    """Runs in a child process: one size, timed phases, peak RSS."""
    from curate.config import PrismConfig
    from curate.engine.outputs import versions
    from curate.engine.shards import run_ingest
    from curate.jobs.prism import write_routed
    from curate.ingest.ingest import helper_count
    from curate.corpus.route import RouteConfig

    versions()  # imports torch/transformers/datasets, as a real run has by route time: not timed
    record_helper_peaks()
    baseline = rss_mb()
    with tempfile.TemporaryDirectory(prefix="curate-scale-") as tmp:
        tmp = Path(tmp)
        calibration = calibration_us(tmp)
        kinds = synthetic_jsonl(tmp / "input.jsonl", n)
        cfg = PrismConfig(input=[str(tmp / "input.jsonl")], out=str(tmp / "routed"), shard_size=shard_size)
        t0 = time.perf_counter()
        ing, _ = run_ingest(cfg, tmp / "work" / "ingest")
        t_ingest = time.perf_counter() - t0
        tok, prb = synthetic_signal_shards(ing, tmp / "work", n_modules)
        state = {"config": {"prefix": "none"}, "ingest": ing, "tokenize": tok, "probe": prb, "prefix": None,
                 "model": {"name": "synthetic"}, "modules": [f"m{i}" for i in range(n_modules)],
                 "timings": {"ingest": t_ingest}, "cache": {}}
        t0 = time.perf_counter()
        manifest = write_routed(state, RouteConfig(), Path(cfg.out))
        t_route = time.perf_counter() - t0
        helpers = helper_count(cfg.ingest(), [Path(f["path"]) for f in ing["files"]])
    c = manifest["counts"]
    return {"records": n, "kinds": kinds, "counts": {k: c[k] for k in ("input", "sft", "rl", "quarantined", "duplicates")},
            "shards": len(ing["shards"]), "parse_helpers": helpers, "calibration_us_per_record": calibration,
            "ingest_s": round(t_ingest, 3), "route_s": round(t_route, 3),
            "ingest_records_per_s": round(n / t_ingest), "route_records_per_s": round(n / t_route),
            "records_per_s": round(n / (t_ingest + t_route)),
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(rss_mb(), 1),
            "peak_minus_baseline_mb": round(rss_mb() - baseline, 1),
            "helper_peak_rss_mb": round(max(HELPER_PEAKS_MB, default=0.0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--modules", type=int, default=210, help="gradient norms per record (SmolLM2: 210)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs per size; the median one is shown")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.shard_size, args.modules)))
        return
    results = []
    for n in args.sizes:
        runs = []
        for r in range(args.repeat):
            print(f"scale_bench: {n} records, run {r + 1}/{args.repeat} ...", file=sys.stderr)
            cmd = [sys.executable, __file__, "--one", str(n), "--shard-size", str(args.shard_size),
                   "--modules", str(args.modules)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        runs.sort(key=lambda run: run["records_per_s"])
        median = dict(runs[len(runs) // 2])  # the run with the median ingest + route speed, and the spread
        median["all_runs"] = [{k: run[k] for k in ("records_per_s", "calibration_us_per_record")} for run in runs]
        results.append(median)
    print(json.dumps({"benchmark": "scale", "what": "ingest + route (tokenize/probe shards synthetic)",
                      "shard_size": args.shard_size, "modules": args.modules, "repeat": args.repeat,
                      "sizes": results,
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]}},
                     indent=2))


if __name__ == "__main__":
    main()
