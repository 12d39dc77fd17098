"""Crash safety: SIGKILL at many points (ingest, probe, routing) then rerun -> byte-identical output with
no duplicate or missing record; a dask worker dying mid-task -> the shard is recomputed, same output.

Kills are real SIGKILLs of a `curate prism` process. To hit exact points (between a data file and its
done marker, between a temporary file and its rename, between the swap of routed/ and the manifest),
this module doubles as a driver: `python -m tests.test_crash_safety PATTERN N before|after -- ARGS`
runs the CLI with os.replace and os.rename wrapped so that the process kills itself around the N-th
rename onto a path matching PATTERN. Nothing in curate knows about it. One test also kills the plain CLI from outside when
a probe marker appears."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from curate.cli import main
from curate.config import PrismConfig
from curate.engine.executors import DaskExecutor, LocalExecutor
from curate.engine.shards import run_ingest, run_sharded
from curate.stages.tokenize import Tokenize

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "gsm8k_prompt_completion.jsonl"
VOLATILE = ("timings_s", "cache")  # manifest fields that legitimately differ between runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 real GSM8K records, a malformed line and a duplicate: 42 input records."""
    lines = DEMO.read_text().splitlines()
    path = tmp_path_factory.mktemp("in") / "gsm8k.jsonl"
    path.write_text("\n".join(lines[:20] + ['{"prompt": "cut', lines[3]] + lines[20:]) + "\n")
    return path


def prism_args(corpus: Path, out: Path, model: str) -> list[str]:
    return ["prism", "--input", str(corpus), "--out", str(out), "--model", model, "--max-length", "96",
            "--batch-tokens", "512", "--shard-size", "5", "--device", "cpu"]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file's bytes (the manifest without its volatile fields); the cache is left out."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".work/"):
            data = p.read_bytes()
            if rel == "manifest.json":
                m = json.loads(data)
                data = json.dumps({k: v for k, v in m.items() if k not in VOLATILE}, sort_keys=True).encode()
            files[rel] = data
    return files


@pytest.fixture(scope="module")
def reference(corpus, tiny_model_dir, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted run, written at the same path the kill tests use (the manifest names it)."""
    base = tmp_path_factory.mktemp("ref")
    out = base / "out"
    assert main(prism_args(corpus, out, tiny_model_dir)) == 0
    snap = snapshot(out)
    shutil.rmtree(out)
    return {"snapshot": snap, "base": base}


def killed_run(args: list[str], pattern: str, n: int, when: str) -> int:
    cmd = [sys.executable, "-m", "tests.test_crash_safety", pattern, str(n), when, "--", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode


def assert_complete_and_identical(out: Path, reference: dict) -> None:
    assert snapshot(out) == reference["snapshot"]
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == 42 and c["duplicates"] == 1 and c["quarantined"] == 1
    assert c["sft"] + c["rl"] == 40
    assert not list(out.rglob("*.tmp")) and not (out / ".staging").exists()
    assert sorted(p.name for p in out.parent.glob(".out.*")) == [".out.curate.lock"]  # no staging, no old


# Kill points, one after another on the same output folder; each run resumes what the previous left.
KILL_CHAIN = [
    ("*/ingest/part-*.arrow", 3, "after"),        # mid-ingest (ingest is all-or-nothing: redone)
    ("*/tokenize/part-*.done.json", 2, "after"),  # tokenize shards 0-1 committed
    ("*/probe/part-*.arrow", 2, "after"),         # probe data file written, its marker not yet
    ("*/probe/part-*.done.json", 2, "before"),    # a marker's temporary file left behind
    ("*/probe/part-*.done.json", 3, "after"),     # a few more probe shards
    ("*/.out.staging/sft/part-*.arrow", 1, "after"),  # routing: staging half written
    ("*/.out.staging/manifest.json", 1, "after"),     # staging complete, the switch not begun
    ("*/.out.staging/.work", 1, "after"),             # the switch: the cache carried into the staging
    ("*/.out.old", 1, "after"),                       # the switch: no OUT for an instant
]


def test_sigkill_at_commit_points_then_rerun_is_identical(corpus, reference, tiny_model_dir):
    out = reference["base"] / "out"
    args = prism_args(corpus, out, tiny_model_dir)
    for pattern, n, when in KILL_CHAIN:
        code = killed_run(args, pattern, n, when)
        assert code == -signal.SIGKILL, f"the run was not killed at {pattern} #{n} {when} (exit {code})"
        if when == "before":
            assert list(out.rglob("*.tmp")), "the 'before' kill should have left a temporary file"
    assert main(args) == 0
    assert_complete_and_identical(out, reference)
    shutil.rmtree(out)


def test_kill_during_a_changed_config_run_then_the_old_config(corpus, reference, tiny_model_dir):
    """Shard files are overwritten in place by a run with another config; a kill between a new data file
    and its marker must not leave the old marker vouching for the new file."""
    out = reference["base"] / "out"
    args = prism_args(corpus, out, tiny_model_dir)
    assert main(args) == 0
    changed = [*args, "--max-length", "80"]  # the later flag wins: new tokenize and probe keys
    assert killed_run(changed, "*/probe/part-*.arrow", 2, "after") == -signal.SIGKILL
    assert main(args) == 0
    assert_complete_and_identical(out, reference)
    shutil.rmtree(out)


def test_rerun_recomputes_only_changed_stages_and_force_recomputes_all(corpus, reference, tiny_model_dir):
    out = reference["base"] / "out"
    args = prism_args(corpus, out, tiny_model_dir)
    assert main(args) == 0

    def computed(*extra) -> dict:
        assert main([*args, *extra]) == 0
        cache = json.loads((out / "manifest.json").read_text())["cache"]
        return {stage: c["computed"] for stage, c in cache.items() if stage in ("ingest", "tokenize", "probe")}

    assert computed("--metric", "cv") == {"ingest": 0, "tokenize": 0, "probe": 0}  # routing only
    assert computed("--modules", "q_proj", "down_proj") == {"ingest": 0, "tokenize": 0, "probe": 8}
    assert computed("--max-length", "80") == {"ingest": 0, "tokenize": 8, "probe": 8}
    assert computed("--force") == {"ingest": 1, "tokenize": 8, "probe": 8}
    assert computed() == {"ingest": 0, "tokenize": 0, "probe": 0}
    assert_complete_and_identical(out, reference)
    shutil.rmtree(out)


def test_sigkill_from_outside_during_probe(corpus, reference, tiny_model_dir):
    out = reference["base"] / "out"
    args = prism_args(corpus, out, tiny_model_dir)
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", *args[:]], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / ".work" / "probe" / "part-00002.done.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    assert main(args) == 0
    assert_complete_and_identical(out, reference)
    m = json.loads((out / "manifest.json").read_text())
    assert m["cache"]["probe"]["cached"] >= 3  # the shards finished before the kill were not redone
    shutil.rmtree(out)


class DyingTokenize(Tokenize):
    """The real tokenize stage, except that the first attempt anywhere kills its worker process (the
    flag file is created exclusively, so exactly one task dies, whichever worker runs it first)."""

    def __init__(self, config, flag: str):
        super().__init__(config)
        self.flag = flag

    def run(self, shard):
        try:
            open(self.flag, "x").close()
        except FileExistsError:
            return super().run(shard)
        os._exit(1)  # no cleanup, no exception: the process is gone mid-task


def test_dask_worker_death_recomputes_the_shard(corpus, tiny_model_dir, tmp_path):
    cfg = PrismConfig(input=[str(corpus)], out=str(tmp_path / "o"), model=tiny_model_dir, max_length=96,
                      shard_size=5)
    ing, _ = run_ingest(cfg, tmp_path / "ingest")
    local, _ = run_sharded(Tokenize(cfg.tokenize()), ing["shards"], tmp_path / "local", LocalExecutor(), False)
    executor = DaskExecutor(workers=2)
    try:
        flag = tmp_path / "died"
        remote, stats = run_sharded(DyingTokenize(cfg.tokenize(), str(flag)), ing["shards"], tmp_path / "dask",
                                    executor, False)
    finally:
        executor.close()
    assert flag.exists() and stats == {"computed": 8, "cached": 0}
    strip = lambda done: {k: v for k, v in done.items() if k != "path"}  # noqa: E731
    assert [strip(d) for d in remote] == [strip(d) for d in local]
    for i in range(len(local)):
        name = f"part-{i:05d}.arrow"
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _driver(argv: list[str]) -> int:
    """Run the CLI, SIGKILLing this process before/after the n-th os.replace onto a matching path."""
    pattern, n, when = argv[0], int(argv[1]), argv[2]
    args = argv[argv.index("--") + 1:]
    seen, lock = [0], threading.Lock()  # routing writes shards from several threads

    def killing(real):
        def rename(src, dst, **kw):
            hit = fnmatch.fnmatch(str(dst), pattern)
            with lock:
                seen[0] += hit
                chosen = hit and seen[0] == n
            if chosen and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, **kw)
            if chosen and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
        return rename

    os.replace, os.rename = killing(os.replace), killing(os.rename)
    return main(args)


if __name__ == "__main__":
    sys.exit(_driver(sys.argv[1:]))
