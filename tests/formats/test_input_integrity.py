"""Ingest never changes, merges or drops input silently: each case below is a small input that used to
be read wrong without a word (or crashed the run), and what ingest does with it now.

Cases (numbered as in the review that found them):
 1. a DatasetDict folder: its train split only by default, the other splits listed; --split NAME|all;
    `source` names the split
 2. a save_to_disk state.json naming a data file outside its folder is refused
 3. numbers as text: "8", never "8.0" (pandas makes an int column with a gap float); NaN is missing
 4. a short `answer` is the ground truth even when it is the reply itself
 5. the GSM8K "#### N" rule holds in every format: one item, one ground truth, one id
 6. fields a format does not read are kept as `metadata` (JSON text), outside the id, into routed rows
 7. everything a folder holds and ingest does not read is listed (types, hidden, curate's own outputs)
 8. UTF-16 / UTF-32 JSON is decoded (BOM or NULs), a UTF-8 BOM accepted
 9. JSON nested deeper than the parser goes: a quarantined record, or a file error naming the file
10. a folder that cannot be listed, a file name that is not UTF-8: an error naming it, or skipped
11. any exception on one record is its quarantine reason, never the run's end
Every ingest here checks that the counts reconcile: input = kept + quarantined + duplicates."""

from __future__ import annotations

import codecs
import datetime
import gzip
import json
import math
import os
import shutil
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from curate import config, schema
from curate.jobs import drift
from curate.cli import build_parser, main
from curate.formats import adapters
from curate.formats.adapters import FORMATS, normalize, record_id
from curate.io.atomic import read_arrow
from curate.io.readers import UnreadableFile, read_records, scan_inputs
from curate.ingest.ingest import IngestConfig, ingest
from tests.test_bad_input import parse_procs  # noqa: F401 - the fixture: in-process and on 2 helpers

U, A = "user", "assistant"
GSM8K = Path(__file__).resolve().parents[1] / "data" / "real" / "gsm8k" / "train.lines1-2000.jsonl"


def chat(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": U, "content": q}, {"role": A, "content": a}], **extra}


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run_ingest(inputs, parse_procs=0, **kw):
    shards, quarantine = [], []
    res = ingest(IngestConfig([str(p) for p in inputs], shard_size=4, parse_procs=parse_procs, **kw),
                 lambda i, t: shards.append(t), quarantine.append)
    rows = pa.concat_tables(shards).to_pylist() if shards else []
    c = res.counts
    assert c["input"] == len(rows) + c["quarantined"] + c["duplicates"], c
    assert c["quarantined"] == len(quarantine)
    return res, rows, quarantine


# ------------------------------------------------------------------ 1. DatasetDict splits, --split

TRAIN = [chat("q1", "a1"), chat("q2", "a2")]
TEST = [chat("t1", "b1")]


def dataset_dict(folder: Path, splits: dict[str, list[dict]]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    return folder


def test_case1_dataset_dict_reads_train_by_default_and_lists_the_other_splits(tmp_path):
    folder = dataset_dict(tmp_path / "dd", {"train": TRAIN, "test": TEST})
    res, rows, _ = run_ingest([folder])
    assert [(r["source"], r["source_index"], r["messages"][0]["content"]) for r in rows] == [
        (str(folder / "train"), 0, "q1"), (str(folder / "train"), 1, "q2")]
    assert res.skipped == [{"path": str(folder / "test"), "records_read": 0,
                            "reason": "split 'test' not read (use --split test, or --split all)"}]
    assert res.counts["input"] == 2


def test_case1_split_option_chooses_a_split_or_all_and_source_tells_them_apart(tmp_path):
    folder = dataset_dict(tmp_path / "dd", {"train": TRAIN, "test": TEST})
    res, rows, _ = run_ingest([folder], split="test")
    assert [(r["source"], r["source_index"]) for r in rows] == [(str(folder / "test"), 0)]
    assert [s["path"] for s in res.skipped] == [str(folder / "train")]
    res, rows, _ = run_ingest([folder], split="all")
    assert [(Path(r["source"]).name, r["source_index"]) for r in rows] == [("test", 0), ("train", 0), ("train", 1)]
    assert res.skipped == [] and res.counts["input"] == 3
    # the same content in two splits is still one record (a duplicate), but the kept one says where it was
    folder2 = dataset_dict(tmp_path / "dd2", {"train": TRAIN, "test": TRAIN[:1]})
    res, rows, _ = run_ingest([folder2], split="all")
    assert res.counts["duplicates"] == 1 and [r["source"] for r in rows] == [str(folder2 / "test"),
                                                                              str(folder2 / "train")]


def test_case1_dataset_dict_without_the_split_is_an_input_error_naming_it(tmp_path, capsys, tiny_model_dir):
    folder = dataset_dict(tmp_path / "dd", {"validation": TEST, "test": TEST})
    for kw in ({}, {"skip_bad_files": True}):
        with pytest.raises(UnreadableFile) as e:
            run_ingest([folder], **kw)
        msg = str(e.value)
        assert msg.startswith(f"{folder}: ") and "no 'train' split" in msg and "validation, test" in msg, msg
        assert "--split" in msg
    with pytest.raises(UnreadableFile, match="no 'nope' split"):
        run_ingest([folder], split="nope")
    assert main(["prism", "--input", str(folder), "--out", str(tmp_path / "o"), "--model", tiny_model_dir]) == 2
    assert str(folder) in capsys.readouterr().err


def test_case1_split_flag_reaches_the_ingest_config_and_its_cache_key(tmp_path):
    args = build_parser().parse_args(["prism", "--input", "x", "--split", "test"])
    cfg = config.from_args(args, config.PrismConfig)
    assert cfg.split == "test" and cfg.ingest().split == "test"
    args = build_parser().parse_args(["drift", "--input", "x", "--split", "all"])
    assert config.from_args(args, config.DriftConfig).ingest().split == "all"
    assert IngestConfig(["x"], split="test").cache_fields() != IngestConfig(["x"]).cache_fields()
    plain = tmp_path / "a.jsonl"
    plain.write_text(jsonl(TRAIN))
    with pytest.raises(ValueError, match="--split test: no input is a Hugging Face DatasetDict"):
        scan_inputs([plain], split="test")


# ------------------------------------------------------------------ 2. save_to_disk paths stay inside

def test_case2_state_json_naming_a_file_outside_the_folder_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "a" / "ds"
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(folder))
    (shard,) = folder.glob("*.arrow")
    shutil.copy(shard, tmp_path / "x.arrow")  # a real Arrow file, outside the dataset folder
    state = json.loads((folder / "state.json").read_text())
    for name in ("../../x.arrow", str(tmp_path / "x.arrow")):
        state["_data_files"] = [{"filename": name}]
        (folder / "state.json").write_text(json.dumps(state))
        with pytest.raises(UnreadableFile) as e:
            list(read_records(folder))
        assert str(e.value).startswith(f"{folder}: ") and "outside the folder" in str(e.value)
        with pytest.raises(UnreadableFile, match="outside the folder"):
            run_ingest([folder])
        res, rows, _ = run_ingest([folder], skip_bad_files=True)
        assert rows == [] and [s["path"] for s in res.skipped] == [str(folder)]
    # a link out of the folder is outside too
    state["_data_files"] = [{"filename": "link.arrow"}]
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "link.arrow").symlink_to(tmp_path / "x.arrow")
    with pytest.raises(UnreadableFile, match="outside the folder"):
        list(read_records(folder))


def test_case2_dataset_dict_naming_a_split_outside_the_folder_is_refused(tmp_path):
    folder = dataset_dict(tmp_path / "dd", {"train": TRAIN})
    dataset_dict(tmp_path / "elsewhere", {"train": TEST})
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "../elsewhere/train"]}))
    with pytest.raises(UnreadableFile, match="names a split outside the folder"):
        run_ingest([folder], split="all")


# ------------------------------------------------------------------ 3. numbers as text

@pytest.mark.parametrize(("value", "text"), [
    (8, "8"), (8.0, "8"), (-3.0, "-3"), (0.5, "0.5"), (0.1 + 0.2, "0.30000000000000004"), (1e-7, "1e-07"),
    (1e20, "1e+20"), (Decimal("8.00"), "8"), (Decimal("0.50"), "0.5"), ([8.0, 0.5, math.nan], "[8, 0.5, null]"),
    ({"x": 2.0}, '{"x": 2}'), ("8.0", "8.0"), (True, "true"), (math.nan, None), (None, None),
])
def test_case3_ground_truth_numbers_are_canonical_text(value, text):
    assert normalize(chat("q", "a", ground_truth=value)).ground_truth == text


def test_case3_answer_numbers_and_nan_outcomes():
    assert normalize(chat("q", "a", answer=12.0)).ground_truth == "12"
    assert normalize(chat("q", "a", answer=math.nan)).ground_truth is None
    qa = normalize({"question": "2+2?", "answer": 4.0})
    assert qa.messages[1]["content"] == "4" and qa.ground_truth == "4"
    pc = normalize({"prompt": "half of one?", "answer": 0.5})
    assert pc.messages[1]["content"] == "0.5" and pc.ground_truth == "0.5"
    with pytest.raises(adapters.BadRecord, match="field 'answer' is missing \\(NaN\\)"):
        normalize({"question": "2+2?", "answer": math.nan})
    assert normalize(chat("q", "a", reward=math.nan)).reward is None  # missing, not a quarantine
    assert normalize(chat("q", "a", reward=math.nan, score=0.5)).reward == 0.5
    with pytest.raises(adapters.BadRecord, match="must be finite, got inf"):
        normalize(chat("q", "a", reward=math.inf))


def test_case3_pandas_int_column_with_a_gap(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"messages": [r["messages"] for r in (chat("q1", "a"), chat("q2", "b"), chat("q3", "c"))],
                          "ground_truth": [8, None, 3], "reward": [1, None, 0]})
    assert str(frame["ground_truth"].dtype) == "float64"  # what pandas does with an int column with a gap
    frame.to_parquet(tmp_path / "x.parquet")
    frame.to_json(tmp_path / "x.jsonl", orient="records", lines=True)
    (tmp_path / "nan.jsonl").write_text('{"messages": [{"role": "user", "content": "q4"}, {"role": "assistant", '
                                        '"content": "d"}], "ground_truth": NaN, "reward": NaN}\n')
    for name, truths, rewards in (("x.parquet", ["8", None, "3"], [1.0, None, 0.0]),
                                  ("x.jsonl", ["8", None, "3"], [1.0, None, 0.0]),
                                  ("nan.jsonl", [None], [None])):
        res, rows, quarantine = run_ingest([tmp_path / name])
        assert quarantine == []
        assert [r["ground_truth"] for r in rows] == truths and [r["reward"] for r in rows] == rewards, name


# ------------------------------------------------------------------ 4. a short answer is the ground truth

@pytest.mark.parametrize(("raw", "truth"), [
    ({"question": "What is the capital of Japan?", "answer": "Tokyo"}, "Tokyo"),
    ({"prompt": "What is 6 * 2?", "answer": "12"}, "12"),
    (chat("What is 6 * 2?", "12", answer="12"), "12"),
    ({"prompt": "What is 6 * 2?", "answer": 12}, "12"),
    ({"question": "q", "answer": "x" * 101}, None),  # a worked solution, not a final answer
])
def test_case4_a_short_answer_is_the_ground_truth_even_when_it_is_the_reply(raw, truth):
    assert normalize(raw).ground_truth == truth


# ------------------------------------------------------------------ 5. "#### N" in every format

def test_case5_one_gsm8k_item_has_one_ground_truth_and_one_id_in_every_format(tmp_path):
    item = json.loads(GSM8K.read_text().splitlines()[0])
    q, a = item["question"], item["answer"]
    assert a.rstrip().endswith("#### 72")
    forms = {
        "question_answer": item,
        "prompt_completion": {"prompt": q, "completion": a},
        "prompt_completion (answer)": {"prompt": q, "answer": a},
        "prompt_completion (TRL lists)": {"prompt": [{"role": U, "content": q}],
                                          "completion": [{"role": A, "content": a}]},
        "messages": chat(q, a),
        "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "alpaca": {"instruction": q, "input": "", "output": a},
        "hh": {"prompt": q, "chosen": a},
    }
    results = {name: normalize(raw) for name, raw in forms.items()}
    assert {n.format for n in results.values()} >= {"question_answer", "prompt_completion", "messages", "sharegpt",
                                                      "alpaca", "hh"}
    assert {name: n.ground_truth for name, n in results.items()} == {name: "72" for name in forms}
    assert len({record_id(n) for n in results.values()}) == 1
    # through ingest: one record, the others its duplicates
    path = tmp_path / "forms.jsonl"
    path.write_text(jsonl(list(forms.values())))
    res, rows, _ = run_ingest([path])
    assert len(rows) == 1 and rows[0]["ground_truth"] == "72" and res.counts["duplicates"] == len(forms) - 1
    # a "####" that does not open the last line is a Markdown heading, in every format alike
    assert normalize(chat("q", "#### Step 1\nadd them")).ground_truth is None
    assert normalize({"question": "q", "answer": "#### Step 1\nadd them, " + "then more " * 10}).ground_truth is None


# ------------------------------------------------------------------ 6. metadata

def test_case6_fields_a_format_does_not_read_are_kept_as_metadata_outside_the_id():
    plain = normalize(chat("q", "a"))
    rich = normalize(chat("q", "a", weight=2, category="math", uid="a1", gone=None, gap=math.nan,
                          nested={"b": [1, math.nan], "a": "é"}))
    assert plain.metadata is None
    # keys sorted; null and NaN fields are missing ones, left out; a NaN inside a value is null
    assert rich.metadata == '{"category":"math","nested":{"a":"é","b":[1,null]},"uid":"a1","weight":2}'
    assert record_id(rich) == record_id(plain)  # metadata is not part of the content hash
    # what each format reads is not metadata; what it does not read is
    assert normalize({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                      "system": "s", "id": 7}).metadata == '{"id":7}'
    both = normalize(chat("q", "a", conversations=[{"from": "human", "value": "other"}]))
    assert json.loads(both.metadata) == {"conversations": [{"from": "human", "value": "other"}]}
    assert normalize(chat("q", "a", reward=1, score=0.5)).metadata == '{"score":0.5}'
    assert normalize(chat("q", "a", answer="x = 3")).metadata is None  # the answer became the ground truth
    assert json.loads(normalize(chat("q", "a", answer="y" * 101)).metadata) == {"answer": "y" * 101}
    hh = normalize({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"})
    assert json.loads(hh.metadata) == {"rejected": "\n\nHuman: hi\n\nAssistant: no"}
    # a lone surrogate (a "\ud800" JSON escape) is kept as its escape: valid UTF-8 text, the same value
    odd = normalize(chat("q", "a", note="\ud800"))
    assert odd.metadata.encode("utf-8") and json.loads(odd.metadata) == {"note": "\ud800"}


SAMPLES = {
    "messages": chat("hi", "hello"),
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "s"},
    "prompt_completion": {"prompt": "hi", "completion": "hello", "reward": 1},
    "question_answer": {"problem": "p", "solution": "\\boxed{1}", "answer": "1"},
    "alpaca": {"instruction": "hi", "input": "", "output": "hello", "system": "", "history": []},
    "hh": {"prompt": "hi", "chosen": "hello"},
    "transcript": {"traj": "Your task is to: look.\n> look\nYou see a desk.", "problem": "p", "success": True},
    "actions": {"problem": "buy socks", "action_history": ["search[socks]", "click[Buy Now]"], "score": 0.5},
    "webshop_session": {"page": "done", "url": "http://h/done/s1/B01/%7B%7D", "goal": {"instruction_text": "buy"},
                        "content": {"asin": "B01"}, "reward": 1.0},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_case6_every_format_reads_its_own_fields_and_keeps_the_rest(fmt):
    n = normalize(SAMPLES[fmt])
    # a WebShop done page's content is the purchase, which no message holds
    own = {"purchase": SAMPLES[fmt]["content"]} if fmt == "webshop_session" else {}
    assert n.format == fmt and (json.loads(n.metadata) if n.metadata else {}) == own
    assert json.loads(normalize({**SAMPLES[fmt], "category": "c", "weight": 0.5}).metadata) == {"category": "c",
                                                                                                 "weight": 0.5, **own}


def test_case6_metadata_from_parquet_types(tmp_path):
    table = pa.table({"messages": [chat("q", "a")["messages"]],
                      "when": pa.array([datetime.datetime(2024, 5, 1, 12, 30)], pa.timestamp("us")),
                      "blob": pa.array([b"\x00\xff"], pa.binary())})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "x.parquet")
    _, rows, _ = run_ingest([tmp_path / "x.parquet"])
    assert json.loads(rows[0]["metadata"]) == {"blob": "AP8=", "when": "2024-05-01T12:30:00"}


def test_case6_metadata_reaches_routed_and_drift_rows_and_case7_out_inside_input(tmp_path, tiny_model_dir):
    assert "metadata" in schema.columns(schema.RECORD) and "metadata" in schema.columns(schema.ROUTED)
    assert "metadata" in drift.RECORD_COLUMNS and set(drift.RECORD_COLUMNS) <= set(schema.columns(drift.DRIFT))
    raw = tmp_path / "raw"
    raw.mkdir()
    records = [chat(f"question {i}", f"answer {i}", weight=i, category="c", reward=float(i % 2)) for i in range(4)]
    records.append(chat("no extras", "here"))
    (raw / "a.jsonl").write_text(jsonl(records))
    out = raw / "routed"  # an output inside the input: never read back
    args = ["prism", "--input", str(raw), "--out", str(out), "--model", tiny_model_dir, "--max-length", "64"]
    for _ in range(2):  # the second run does not read the first one's output back
        assert main(args) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["counts"]["input"] == 5 and m["counts"]["duplicates"] == 0
    rows = [r for part in ("sft", "rl") for f in sorted((out / part).glob("*.arrow"))
            for r in read_arrow(f).to_pylist()]
    got = {r["messages"][0]["content"]: r["metadata"] for r in rows}
    assert got == {**{f"question {i}": json.dumps({"category": "c", "weight": i}, separators=(",", ":"))
                      for i in range(4)}, "no extras": None}
    # drift (recorded verifier: no model) keeps it too
    dout = tmp_path / "drift"
    assert main(["drift", "--input", str(raw / "a.jsonl"), "--out", str(dout), "--verifier", "recorded"]) == 0
    drows = [r for f in sorted((dout / "sft").glob("*.arrow")) for r in read_arrow(f).to_pylist()]
    assert drows and all(r["metadata"] == got[r["messages"][0]["content"]] for r in drows)


def test_case6_routing_an_older_cache_without_metadata_gives_null():
    from curate.corpus.route import RouteConfig, routed_rows, simple_decision

    rec = pa.Table.from_pylist([{"id": "x", "source": "s", "source_index": 0, "format": "messages",
                                 "messages": chat("q", "a")["messages"]}], schema=schema.arrow_schema(schema.RECORD))
    old = rec.drop_columns(["metadata"])
    tokens = pa.table({"n_tokens": [3], "n_loss_tokens": [1], "truncated": [False]})
    probe = pa.table({"probe_loss": pa.array([1.0], pa.float32()),
                      "grad_norms": pa.array([[1.0, 2.0]], pa.list_(pa.float32())),
                      "grad_norm_total": pa.array([2.2], pa.float32())})
    table = routed_rows(old, tokens, probe, simple_decision(old, probe, 0.5, RouteConfig()))
    assert table.schema == schema.arrow_schema(schema.ROUTED) and table.column("metadata").to_pylist() == [None]


# ------------------------------------------------------------------ 7. nothing in a folder skipped silently

def test_case7_everything_not_read_is_listed_with_why(tmp_path):
    root = tmp_path / "in"
    for rel, text in [("a.jsonl", jsonl(TRAIN)), ("notes.csv", "a,b\n"), ("data.txt", "x"), ("README.md", "#"),
                      ("SOURCE.md", "#"), ("LICENSE", "MIT"), ("README.json", "{}"), (".hidden.jsonl", jsonl(TEST)),
                      (".git/x.jsonl", jsonl(TEST)), ("sub/b.csv.gz", ""),
                      ("old_run/manifest.json", json.dumps({"curate_version": "0.1"})),
                      ("old_run/sft/part-00000.arrow", ""), ("old_run/quarantine/part-00000.jsonl", jsonl(TEST)),
                      ("export/manifest.json", json.dumps({"export": {"target": "trl"}})),
                      ("export/rl.jsonl", jsonl(TEST)),
                      ("cache/ingest/ingest.done.json", "{}"), ("cache/ingest/quarantine.jsonl", jsonl(TEST))]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    listing = scan_inputs([root])
    assert listing.units == [root / "a.jsonl"]
    reasons = {Path(s["path"]).relative_to(root).as_posix(): s["reason"] for s in listing.skipped}
    assert reasons == {
        "notes.csv": "unsupported file type .csv", "data.txt": "unsupported file type .txt",
        "sub/b.csv.gz": "unsupported file type .csv.gz",
        "README.md": "a README or licence file, not data", "README.json": "a README or licence file, not data",
        "LICENSE": "a README or licence file, not data", "SOURCE.md": "unsupported file type .md",
        ".hidden.jsonl": "hidden (the name starts with '.')", ".git": "hidden (the name starts with '.')",
        "old_run": "a curate output folder", "export": "a curate output folder", "cache": "a curate work folder",
    }
    assert all(s["records_read"] == 0 for s in listing.skipped)
    res, rows, _ = run_ingest([root])
    assert res.skipped == listing.skipped and res.counts["skipped_files"] == len(listing.skipped)
    assert len(rows) == 2 and res.counts["input"] == 2
    # a folder given by name with nothing to read is still an error, and says what it did not read
    only = tmp_path / "only"
    only.mkdir()
    (only / "x.csv").write_text("a\n")
    with pytest.raises(UnreadableFile, match=r"folder has no input files .*not read: x\.csv"):
        scan_inputs([only])


# ------------------------------------------------------------------ 8. UTF-16 / UTF-32

TEXTS = [chat("café", "naïve 😀"), chat("second", "line")]


def test_case8_utf16_and_utf32_json_is_decoded(tmp_path, parse_procs):
    lines = jsonl(TEXTS)
    files = {
        "le.jsonl": codecs.BOM_UTF16_LE + lines.encode("utf-16-le"),
        "be.jsonl": codecs.BOM_UTF16_BE + lines.encode("utf-16-be"),
        "crlf.jsonl": lines.replace("\n", "\r\n").encode("utf-16"),
        "nobom.jsonl": lines.encode("utf-16-le"),
        "u32.jsonl": lines.encode("utf-32"),
        "u32be.jsonl": codecs.BOM_UTF32_BE + lines.encode("utf-32-be"),
        "gz.jsonl.gz": gzip.compress(lines.encode("utf-16")),
        "array.json": json.dumps(TEXTS, ensure_ascii=False).encode("utf-32"),
        "array16.json": json.dumps(TEXTS, ensure_ascii=False).encode("utf-16"),
        "lines.json": lines.encode("utf-16"),
        "bom8.jsonl": codecs.BOM_UTF8 + lines.encode("utf-8"),
        "bom8.json": codecs.BOM_UTF8 + json.dumps(TEXTS).encode("utf-8"),
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        res, rows, quarantine = run_ingest([path], parse_procs)
        assert quarantine == [] and res.counts["input"] == 2, name
        assert [[(m["role"], m["content"]) for m in r["messages"]] for r in rows] == [
            [(m["role"], m["content"]) for m in t["messages"]] for t in TEXTS], name
        assert [r["source_index"] for r in rows] == [0, 1], name


def test_case8_bad_code_units_quarantine_their_line_only(tmp_path, parse_procs):
    good = jsonl(TEXTS).encode("utf-16-le")
    bad_line = '{"messages": "x"}\n'.encode("utf-16-le").replace(b"x\x00", b"\x00\xd8")  # a lone surrogate
    path = tmp_path / "x.jsonl"
    path.write_bytes(codecs.BOM_UTF16_LE + good + bad_line + b"\x41")  # and an odd byte after the last line
    res, rows, quarantine = run_ingest([path], parse_procs)
    assert len(rows) == 2 and [q["source_index"] for q in quarantine] == [2, 3]
    assert all("not valid UTF-8" in q["reason"] for q in quarantine)


# ------------------------------------------------------------------ 9. nested too deep

DEEP = 100_000


def test_case9_deep_json_line_is_a_quarantined_record(tmp_path, parse_procs):
    deep = '{"messages": ' + "[" * DEEP + "]" * DEEP + "}"
    path = tmp_path / "x.jsonl"
    path.write_text(jsonl(TRAIN[:1]) + deep + "\n" + jsonl(TRAIN[1:]))
    res, rows, quarantine = run_ingest([path], parse_procs)
    assert len(rows) == 2 and [q["source_index"] for q in quarantine] == [1]
    assert "nested too deep" in quarantine[0]["reason"]
    obj = tmp_path / "one.json"  # one object in a .json file: read as JSON lines, the record quarantined
    obj.write_text(deep)
    res, rows, quarantine = run_ingest([obj], parse_procs)
    assert rows == [] and "nested too deep" in quarantine[0]["reason"]


def test_case9_deep_json_array_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + "[" * DEEP + "]" * DEEP + "]")
    with pytest.raises(UnreadableFile) as e:
        run_ingest([path])
    assert str(e.value).startswith(f"{path}: ") and "nested too deep" in str(e.value)
    res, rows, _ = run_ingest([path], skip_bad_files=True)
    assert rows == [] and "nested too deep" in res.skipped[0]["reason"]


def test_case9_a_record_as_deep_as_the_parser_goes_keeps_its_metadata_or_says_why(monkeypatch):
    deep = json.loads("[" * 900 + "]" * 900)
    result = list(adapters.iter_normalized("x", [(0, chat("q", "a", extra=deep))]))[0][2]
    assert json.loads(result.metadata) == {"extra": deep}

    def too_deep(*args, **kwargs):  # what json.dumps raises for a value deeper than it can go
        raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")

    monkeypatch.setattr(adapters.json, "dumps", too_deep)
    result = list(adapters.iter_normalized("x", [(0, chat("q", "a", extra=deep))]))[0][2]
    assert str(result) == "fields ['extra'] are nested too deep to keep as metadata"


# ------------------------------------------------------------------ 10. unreadable folders, bad names

def _deny(monkeypatch, folder: Path) -> None:
    """chmod 000 does not stop root: as root, deny the listing the way the kernel does for others."""
    folder.chmod(0)
    if os.geteuid() == 0:
        real = Path.iterdir

        def iterdir(self):
            if self == folder:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "iterdir", iterdir)


def test_case10_unlistable_folder_fails_naming_it_or_is_skipped(tmp_path, monkeypatch, capsys, tiny_model_dir):
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "x.jsonl").write_text(jsonl(TEST))
    (root / "ok.jsonl").write_text(jsonl(TRAIN))
    _deny(monkeypatch, root / "locked")
    try:
        with pytest.raises(UnreadableFile) as e:
            run_ingest([root])
        assert str(e.value).startswith(f"{root / 'locked'}: ") and "Permission denied" in str(e.value)
        res, rows, _ = run_ingest([root], skip_bad_files=True)
        assert len(rows) == 2
        (entry,) = res.skipped
        assert entry["path"] == str(root / "locked") and "Permission denied" in entry["reason"]
        assert main(["prism", "--input", str(root), "--out", str(tmp_path / "o"), "--model", tiny_model_dir]) == 2
        assert str(root / "locked") in capsys.readouterr().err
    finally:
        (root / "locked").chmod(0o755)


def test_case10_file_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.jsonl").write_text(jsonl(TRAIN))
    bad = os.path.join(os.fsencode(root), b"bad\xff.jsonl")
    fd = os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, jsonl(TEST).encode())
    os.close(fd)
    shown = str(root / "bad\\xff.jsonl")  # the bad byte as an escape: text any output can hold
    for given in (root, os.fsdecode(bad)):
        with pytest.raises(UnreadableFile) as e:
            run_ingest([given])
        assert str(e.value).startswith(f"{shown}: ") and "not valid UTF-8" in str(e.value)
    res, rows, _ = run_ingest([root], skip_bad_files=True)
    assert len(rows) == 2 and [s["path"] for s in res.skipped] == [shown]
    json.dumps(res.skipped, ensure_ascii=False).encode("utf-8")  # writable into the manifest


# ------------------------------------------------------------------ 11. any record-level failure

def test_case11_any_exception_on_a_record_quarantines_it(tmp_path, parse_procs):
    visit = {"goal": {"instruction_text": "buy socks"}}
    session = [
        {**visit, "page": "index", "url": "http://h/s1"},
        {**visit, "page": "search_results", "url": "http://h/search_results/s1/x/1",
         "content": {"keywords": ["socks"], "page": 1e999}},  # JSON 1e999 is infinity: int() raises OverflowError
        {**visit, "page": "done", "url": "http://h/done/s1/B01/%7B%7D", "content": {"asin": "B01"}, "reward": 1.0},
        {**visit, "page": "done", "url": "http://[::1/done", "content": {}, "reward": 1.0},  # urlparse raises
    ]
    path = tmp_path / "x.jsonl"
    path.write_text(jsonl(TRAIN[:1]) + "".join(json.dumps(v) + "\n" for v in session).replace("Infinity", "1e999")
                    + jsonl(TRAIN[1:]))
    res, rows, quarantine = run_ingest([path], parse_procs)
    assert [r["source_index"] for r in rows] == [0, 4, 5]  # the visit with the bad URL is a session of its own
    assert [(q["source_index"], q["reason"]) for q in quarantine] == [
        (1, "OverflowError: cannot convert float infinity to integer")]


def test_case11_an_adapter_bug_is_a_quarantine_reason(monkeypatch):
    def broken(raw, notes):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(adapters._CONVERTERS, "alpaca", broken)
    items = [(0, {"instruction": "i", "output": "o"}), (1, chat("q", "a"))]
    results = [r for _, _, r in adapters.iter_normalized("x", items)]
    assert str(results[0]) == "ZeroDivisionError: boom" and isinstance(results[0], adapters.BadRecord)
    assert results[1].format == "messages"
    with pytest.raises(ValueError, match="unknown format 'csv'"):  # a usage error stays one
        list(adapters.iter_normalized("x", items, "csv"))


def test_ingest_notes_count_records_not_messages(tmp_path):
    two = {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a", "weight": 0}]}
    one = {"messages": [{"role": "user", "content": "r", "weight": 1}, {"role": "assistant", "content": "b"}]}
    (tmp_path / "a.jsonl").write_text(jsonl([two, one]))
    res, rows, _ = run_ingest([tmp_path / "a.jsonl"])
    assert len(rows) == 2 and res.notes == {"message field 'weight' not kept": 2}
