"""Chunked ingest, in this process or on helper processes, gives what one pass over each file gives.

The reference is computed independently of the chunk code: `adapters.iter_normalized` over
`readers.read_records` for each file, ids from `record_id`, first occurrence kept. Real data with
WebShop page-visit sessions (many lines a record) checks that no chunk boundary splits a session."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from curate.formats import adapters
from curate.io import readers
from curate.io.atomic import write_arrow
from curate.ingest import chunks as ingest_chunks
from curate.ingest.ingest import IngestConfig, ingest
from curate.ingest.pool import HelperPool

BAD_RECORDS = Path(__file__).resolve().parent / "data" / "bad" / "records"
FOLDERS = ("webshop_human_sessions", "alfworld_adapt_traces", "gsm8k", "hh_rlhf_harmless")


@pytest.fixture
def inputs(real_data, tmp_path) -> list[str]:
    """Real folders, the bad corpus, and one file where sessions meet each other, blank lines and
    other records (and one session comes back after another: a new record)."""
    a, b = sorted((real_data / "webshop_human_sessions").glob("*.jsonl"))[:2]
    qa = (real_data / "gsm8k" / "test.lines1-300.jsonl").read_bytes().splitlines(keepends=True)[:2]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(a.read_bytes() + b"\n" + b.read_bytes() + qa[0] + a.read_bytes() + qa[1])
    return [str(mixed)] + [str(real_data / f) for f in FOLDERS] + [str(BAD_RECORDS)]


def reference(inputs: list[str], limit: int | None = None) -> tuple[list[tuple], list[tuple]]:
    """(kept (source, index, id), quarantined (source, index, reason)) from one plain pass."""
    kept, bad, seen, n = [], [], set(), 0
    for path in readers.list_input_files(inputs):
        for index, _, result in adapters.iter_normalized(path, readers.read_records(path)):
            if isinstance(result, adapters.BadRecord):
                bad.append((str(path), index, str(result)))
                continue
            rid = adapters.record_id(result)
            if rid not in seen:
                seen.add(rid)
                kept.append((str(path), index, rid))
            if limit is not None and len(seen) >= limit:
                return kept, bad
    return kept, bad


def run(inputs, tmp_path: Path, procs: int, **kw):
    out = tmp_path / f"procs{procs}"
    shards, shas, quarantine = [], [], []

    def write(i, table):
        shards.append(table)
        shas.append(write_arrow(out / f"part-{i:05d}.arrow", table))

    res = ingest(IngestConfig(inputs, shard_size=kw.pop("shard_size", 50), parse_procs=procs, **kw), write,
                 quarantine.append)
    return res, shards, shas, quarantine


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 20])
def test_chunks_and_helpers_match_one_plain_pass(inputs, tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(ingest_chunks, "CHUNK_BYTES", chunk_bytes)
    kept, bad = reference(inputs)
    here = run(inputs, tmp_path, 0)
    helpers = run(inputs, tmp_path, 2)
    res, shards, _, quarantine = here
    rows = pa.concat_tables(shards).select(["source", "source_index", "id"]).to_pylist()
    assert [(r["source"], r["source_index"], r["id"]) for r in rows] == kept
    assert [(q["source"], q["source_index"], q["reason"]) for q in quarantine] == bad
    assert {len(s) for s in shards[:-1]} == {50} and 0 < len(shards[-1]) <= 50
    mixed = [r["source_index"] for r in rows if r["source"].endswith("mixed.jsonl")]
    assert len(mixed) == 4  # session a, session b, a question; a's repeat is a duplicate, then a question
    c = res.counts
    assert c["input"] == len(kept) + c["duplicates"] + len(bad) and c["quarantined"] == len(bad)
    # helpers: the same shard bytes, the same quarantine rows, the same counts
    assert helpers[2] == here[2] and helpers[3] == here[3] and helpers[0].counts == c


@pytest.mark.parametrize("procs", [0, 2])
@pytest.mark.parametrize("limit", [1, 37, 400])
def test_limit_stops_at_the_same_record_with_or_without_helpers(inputs, tmp_path, monkeypatch, procs, limit):
    monkeypatch.setattr(ingest_chunks, "CHUNK_BYTES", 2000)
    kept, bad = reference(inputs, limit)
    res, shards, _, quarantine = run(inputs, tmp_path, procs, limit=limit)
    rows = pa.concat_tables(shards).to_pylist()
    assert [(r["source"], r["source_index"], r["id"]) for r in rows] == kept
    assert [(q["source"], q["source_index"]) for q in quarantine] == [b[:2] for b in bad]
    assert res.counts["input"] == len(kept) + res.counts["duplicates"] + len(bad)


@pytest.mark.parametrize("when", ["before its chunks are sent", "holding chunks"])
def test_a_helper_that_dies_has_its_chunks_redone(real_data, when):
    path = real_data / "gsm8k" / "train.lines1-2000.jsonl"
    chunks = list(readers.read_json_line_chunks(path, 20_000, ingest_chunks.continues("auto")))
    expected = [ingest_chunks.normalize_lines(str(path), s, data, "auto") for s, data in chunks]
    with HelperPool(2, "auto") as pool:
        victim = pool.helpers[0].proc  # the first chunks go to it
        if when == "holding chunks":  # stopped, it cannot answer before the kill: the parent waits on it
            os.kill(victim.pid, signal.SIGSTOP)
            threading.Timer(0.5, os.kill, (victim.pid, signal.SIGKILL)).start()
        else:
            victim.kill()
            victim.wait()
        got = list(pool.map(str(path), chunks))
        assert pool.lost == 1 and len(pool.helpers) == 1
    assert len(got) == len(expected) > 10
    for a, b in zip(got, expected):
        assert a.records.equals(b.records) and a.bad == b.bad


def test_chunks_never_end_inside_a_session(real_data):
    path = sorted((real_data / "webshop_human_sessions").glob("*.jsonl"))[0]
    continues = ingest_chunks.continues("auto")
    chunks = list(readers.read_json_line_chunks(path, 1, continues))
    lines = path.read_bytes().splitlines(keepends=True)
    assert b"".join(data for _, data in chunks) == path.read_bytes()
    assert [s for s, _ in chunks] == [0] + list(itertools.accumulate(d.count(b"\n") for _, d in chunks))[:-1]
    for _, data in chunks[:-1]:
        assert not continues(data.splitlines(keepends=True)[-1], False)  # a page visit would go on
    assert len(chunks) < len(lines)  # sessions of several lines were kept together


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed parent's helpers are reaped by whoever adopts them, or not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_helpers_exit_when_their_parent_is_killed():
    """A SIGKILLed ingest leaves no helper behind: each one reads end-of-file on its stdin and exits."""
    script = ("import sys, time; from curate.ingest.pool import HelperPool\n"
              "pool = HelperPool(2, 'auto'); print(*[h.proc.pid for h in pool.helpers], flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_running(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)


def test_helpers_run_this_curate_whatever_the_working_directory(real_data, tmp_path, monkeypatch):
    """A `curate/` folder in the working directory (another checkout) must not answer for the helpers."""
    (tmp_path / "curate" / "stages").mkdir(parents=True)
    for init in ("curate/__init__.py", "curate/stages/__init__.py"):
        (tmp_path / init).write_text("raise ImportError('the wrong curate')\n")
    monkeypatch.chdir(tmp_path)
    path = real_data / "gsm8k" / "test.lines1-300.jsonl"
    chunks = list(readers.read_json_line_chunks(path, 8_000, ingest_chunks.continues("auto")))
    with HelperPool(2, "auto") as pool:
        got = list(pool.map(str(path), chunks))
        assert pool.lost == 0
    expected = [ingest_chunks.normalize_lines(str(path), s, data, "auto") for s, data in chunks]
    assert all(a.records.equals(b.records) and a.bad == b.bad for a, b in zip(got, expected))
