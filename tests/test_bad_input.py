"""The bad-input corpus (tests/data/bad/, written by make_bad.py): every bad record is quarantined with
its reason, good records in the same files survive intact, unreadable files fail naming the file (exit
code 2) or are listed in the manifest with --skip-bad-files, and the counts reconcile exactly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest

from curate.cli import main
from curate.io.atomic import read_arrow
from curate.schema import load_json_schema
from curate.ingest import chunks as ingest_chunks
from curate.ingest.ingest import IngestConfig, ingest

BAD = Path(__file__).resolve().parent / "data" / "bad"
RECORDS, FILES = BAD / "records", BAD / "files"

# (file, source_index) -> a fragment of the quarantine reason. Exactly these records are quarantined.
EXPECTED = {
    ("truncated.jsonl", 1): "malformed JSON: Unterminated string",
    ("truncated.jsonl", 4): "record is not a JSON object (got list)",
    ("wrong_types.jsonl", 0): "field 'messages' must be a list, got str",
    ("wrong_types.jsonl", 1): "message 0: content must be a string, got int",
    ("wrong_types.jsonl", 2): "field 'reward' must be a number or boolean, got str",
    ("wrong_types.jsonl", 3): "field 'prompt' must be a string or a list of messages, got int",
    ("wrong_types.jsonl", 4): "message 0: must be an object, got list",
    ("empty_content.jsonl", 0): "message 1: content is empty",
    ("empty_content.jsonl", 1): "message 0: content is empty",
    ("empty_content.jsonl", 2): "message 1: content is empty",
    ("turns.jsonl", 0): "no messages",
    ("turns.jsonl", 1): "only system turns",
    ("turns.jsonl", 2): "no assistant turn",
    ("turns.jsonl", 3): "unrecognised record: keys ['tags', 'title']",
    ("unknown_role.jsonl", 0): "unknown role 'narrator'",
    ("unknown_role.jsonl", 1): "unknown role 'alien'",
    ("non_utf8.jsonl", 0): "not valid UTF-8 (byte 0xe9 at offset 46)",
    ("non_utf8.jsonl", 2): "not valid UTF-8 (byte 0xff at offset 0)",
    ("big.jsonl.gz", 1): "malformed JSON",
    ("surrogate.jsonl", 0): "message 0: content has an unpaired surrogate (U+D83D at character 13)",
    ("surrogate.jsonl", 1): "ground truth has an unpaired surrogate (U+DC00",
}
# Good records, first occurrence of each content; dup_a.jsonl 2 and dup_b.json 0 repeat dup_a 0 and 1.
KEPT = [("big.jsonl.gz", 0), ("dup_a.jsonl", 0), ("dup_a.jsonl", 1), ("dup_b.json", 1), ("non_utf8.jsonl", 1),
        ("truncated.jsonl", 0), ("truncated.jsonl", 2)]
N_INPUT = len(EXPECTED) + len(KEPT) + 2  # + 2 duplicates; the zero-byte file and the blank line add none


def physical_records() -> int:
    """Independent count of the records in records/: non-blank lines and JSON array items."""
    n = 0
    for f in sorted(RECORDS.iterdir()):
        if f.suffix == ".py":
            continue
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        n += len(json.loads(data)) if f.suffix == ".json" else sum(1 for ln in data.splitlines() if ln.strip())
    return n


@pytest.fixture(params=[0, 2], ids=["in-process", "2-helpers"])
def parse_procs(request, monkeypatch):
    """Every ingest check runs in this process and on helper processes fed 64-byte chunks (so most
    lines, and the gzip stream's break, fall in chunks of their own)."""
    if request.param:
        monkeypatch.setattr(ingest_chunks, "CHUNK_BYTES", 64)
    return request.param


def run_ingest(inputs, parse_procs=0, **kw):
    shards, quarantine = [], []
    res = ingest(IngestConfig([str(p) for p in inputs], shard_size=3, parse_procs=parse_procs, **kw),
                 lambda i, t: shards.append(t), quarantine.append)
    return res, pa.concat_tables(shards) if shards else None, quarantine


def test_every_bad_record_is_quarantined_with_its_reason(parse_procs):
    res, kept, quarantine = run_ingest([RECORDS], parse_procs)
    got = {(Path(q["source"]).name, q["source_index"]): q for q in quarantine}
    assert set(got) == set(EXPECTED)
    for key, fragment in EXPECTED.items():
        assert fragment in got[key]["reason"], (key, got[key]["reason"])
        assert got[key]["stage"] == "ingest" and got[key]["raw"]
    # the 5 MB malformed record keeps only its first 64 KiB in quarantine
    assert len(got[("big.jsonl.gz", 1)]["raw"]) == 64 * 1024

    rows = kept.to_pylist()
    assert [(Path(r["source"]).name, r["source_index"]) for r in rows] == KEPT
    big = rows[0]["messages"][1]["content"]
    assert big == "ok " * (5 * 1024 * 1024 // 3)  # the 5 MB record survives byte for byte
    assert rows[4]["messages"][1]["content"] == "c-a-f-\u00e9"

    c = res.counts
    assert c["input"] == N_INPUT == physical_records()
    assert c["duplicates"] == 2 and c["quarantined"] == len(EXPECTED)
    assert c["input"] == kept.num_rows + c["quarantined"] + c["duplicates"]


def test_unreadable_files_fail_naming_the_file(tmp_path, capsys, tiny_model_dir):
    for bad in ("unreadable.parquet", "cut.jsonl.gz"):
        code = main(["prism", "--input", str(RECORDS), str(FILES / bad), "--out", str(tmp_path / bad),
                     "--model", tiny_model_dir])
        err = capsys.readouterr().err
        assert code == 2 and str(FILES / bad) in err, err
        assert not (tmp_path / bad / "manifest.json").exists()


def test_skip_bad_files_lists_them_and_keeps_what_was_read(parse_procs):
    res, kept, _ = run_ingest([RECORDS, FILES], parse_procs, skip_bad_files=True)
    skipped = {Path(s["path"]).name: s for s in res.skipped}
    assert set(skipped) == {"unreadable.parquet", "cut.jsonl.gz"}
    assert "not a Parquet file" in skipped["unreadable.parquet"]["reason"]
    assert "gzip" in skipped["cut.jsonl.gz"]["reason"]
    assert skipped["unreadable.parquet"]["records_read"] == 0
    # records before the point where the gzip stream breaks are ingested and counted
    cut = [r for r in kept.to_pylist() if r["source"].endswith("cut.jsonl.gz")]
    assert len(cut) == skipped["cut.jsonl.gz"]["records_read"] > 0
    assert [r["source_index"] for r in cut] == list(range(len(cut)))
    assert res.counts["input"] == N_INPUT + len(cut)
    assert res.counts["input"] == kept.num_rows + res.counts["quarantined"] + res.counts["duplicates"]


def test_full_run_reconciles_and_quarantine_matches_schema(tmp_path, tiny_model_dir):
    out = tmp_path / "routed"
    code = main(["prism", "--input", str(RECORDS), str(FILES / "unreadable.parquet"), "--out", str(out),
                 "--model", tiny_model_dir, "--max-length", "64", "--shard-size", "3", "--skip-bad-files"])
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert [Path(s["path"]).name for s in m["skipped_files"]] == ["unreadable.parquet"]
    assert c["input"] == N_INPUT and c["duplicates"] == 2
    lines = (out / "quarantine" / "part-00000.jsonl").read_text().splitlines()
    assert len(lines) == c["quarantined"] == len(EXPECTED) + c.get("quarantined_tokenize", 0)
    schema = load_json_schema("quarantine")
    for line in lines:
        jsonschema.validate(json.loads(line), schema)
    routed = [read_arrow(f) for part in ("sft", "rl") for f in sorted((out / part).glob("*.arrow"))]
    n_routed = sum(t.num_rows for t in routed)
    assert c["sft"] + c["rl"] == n_routed
    assert c["input"] == n_routed + c["quarantined"] + c["duplicates"]
    ids = [i for t in routed for i in t.column("id").to_pylist()]
    assert len(ids) == len(set(ids))  # no duplicate made it through
