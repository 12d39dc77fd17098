"""Writes the bad-input corpus next to this file (run once; the outputs are committed).

records/  files whose bad *records* must be quarantined, each with its reason (tests/test_bad_input.py
          lists the expected reason of every record); the good records in them must survive.
files/    files that cannot be read at all: an error naming the file, or skipped with --skip-bad-files.

Deterministic: gzip headers carry mtime 0, so rerunning this script reproduces the same bytes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIG = 5 * 1024 * 1024  # the "5 MB record"


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def gz(path: Path, data: bytes) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)


def main() -> None:
    rec, bad = HERE / "records", HERE / "files"
    rec.mkdir(exist_ok=True)
    bad.mkdir(exist_ok=True)
    good = line(chat("What is 2 + 3?", "5"))
    (rec / "truncated.jsonl").write_text("\n".join([
        good,
        good[: len(good) // 2],                        # cut mid-record
        line(chat("Name a prime.", "7")),
        "",                                            # blank line: consumes an index, yields nothing
        "[1, 2, 3]",                                   # valid JSON, not an object
    ]) + "\n")
    (rec / "wrong_types.jsonl").write_text("\n".join([
        line({"messages": "user: hi / assistant: hello"}),
        line({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "ok"}]}),
        line(chat("Is water wet?", "Yes.", reward="yes")),
        line({"prompt": 17, "completion": "seventeen"}),
        line({"messages": [["user", "hi"], ["assistant", "hello"]]}),
    ]) + "\n")
    (rec / "empty_content.jsonl").write_text("\n".join([
        line(chat("Say something.", "")),
        line(chat("   ", "An answer to nothing.")),
        line({"prompt": "Translate 'cat' to French.", "completion": "\n\t "}),
    ]) + "\n")
    (rec / "turns.jsonl").write_text("\n".join([
        line({"messages": []}),
        line({"messages": [{"role": "system", "content": "You are helpful."}]}),
        line({"messages": [{"role": "user", "content": "Anyone there?"}]}),
        line({"title": "no conversation at all", "tags": ["x"]}),
    ]) + "\n")
    (rec / "unknown_role.jsonl").write_text("\n".join([
        line({"messages": [{"role": "narrator", "content": "Once upon a time"},
                           {"role": "assistant", "content": "there was a test."}]}),
        line({"conversations": [{"from": "alien", "value": "zorp"}, {"from": "gpt", "value": "hello"}]}),
    ]) + "\n")
    (rec / "non_utf8.jsonl").write_bytes(
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}\n'
        + line(chat("Spell caf\u00e9.", "c-a-f-\u00e9")).encode() + b"\n"
        + b"\xff\xfe garbage bytes\n")
    (rec / "surrogate.jsonl").write_text(  # "\\ud800" is valid JSON but not valid Unicode
        '{"messages": [{"role": "user", "content": "half a pair: \\ud83d"}, {"role": "assistant", "content": "ok"}]}\n'
        '{"prompt": "2 + 2?", "completion": "4", "ground_truth": "\\udc00"}\n')
    big_good = line(chat("Summarise this log.", "ok " * (BIG // 3)))
    big_bad = line(chat("Summarise this other log.", "no " * (BIG // 3)))[:-2]  # unterminated
    gz(rec / "big.jsonl.gz", (big_good + "\n" + big_bad + "\n").encode())
    (rec / "empty.jsonl").write_bytes(b"")
    shared = [chat("Capital of France?", "Paris."), chat("Capital of Italy?", "Rome.")]
    (rec / "dup_a.jsonl").write_text("\n".join(line(r) for r in [*shared, shared[0]]) + "\n")
    sharegpt = {"conversations": [{"from": "human", "value": "Capital of Italy?"}, {"from": "gpt", "value": "Rome."}]}
    (rec / "dup_b.json").write_text(json.dumps([sharegpt, chat("Capital of Spain?", "Madrid.")], indent=1) + "\n")

    (bad / "unreadable.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    whole = gzip.compress(("\n".join(line(chat(f"q{i}", f"a{i}")) for i in range(200)) + "\n").encode(), mtime=0)
    (bad / "cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])  # gzip stream ends mid-way


if __name__ == "__main__":
    main()
