"""Raw file reading: every supported container, record indices, bad lines and unreadable files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.io.readers import MAX_RAW_CHARS, SUPPORTED, RawError, UnreadableFile, list_input_files, read_records

ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "reward": 1.0},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "reward": None},
    {"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "ü"}], "reward": 0.5},
]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def records(path: Path) -> list:
    return list(read_records(path))


def test_supported_suffixes():
    bases = {".jsonl", ".json", ".parquet", ".arrow"}
    assert set(SUPPORTED) == bases | {b + ".gz" for b in bases}


def test_jsonl_bad_lines_are_raw_errors_at_their_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(
        jsonl(ROWS[:1])                        # 0
        + b"\n"                                # 1 blank: no record, but the index is consumed
        + b'{"prompt": "a", "completion"\n'     # 2 truncated
        + b'{"prompt": "caf\xe9"}\n'            # 3 latin-1, not UTF-8
        + b"[1, 2]\n"                          # 4 not an object
        + jsonl(ROWS[1:2])                     # 5
        + b'{"last": "no newline"}'            # 6
    )
    out = records(path)
    assert [i for i, _ in out] == [0, 2, 3, 4, 5, 6]
    assert out[0][1] == ROWS[0] and out[4][1] == ROWS[1] and out[5][1] == {"last": "no newline"}
    truncated, latin1, array = out[1][1], out[2][1], out[3][1]
    assert truncated == RawError("malformed JSON: Expecting ':' delimiter (col 29)", '{"prompt": "a", "completion"')
    assert latin1.reason == "not valid UTF-8 (byte 0xe9 at offset 15)" and latin1.raw == '{"prompt": "caf\ufffd"}'
    assert array == RawError("record is not a JSON object (got list)", "[1, 2]")


def test_raw_text_is_truncated(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"x": "' + "a" * (2 * MAX_RAW_CHARS) + "\n", encoding="utf-8")
    ((_, error),) = records(path)
    assert isinstance(error, RawError) and len(error.raw) == MAX_RAW_CHARS


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(ROWS[:2]).replace(b"\n", b"\r\n"))
    assert records(path) == [(0, ROWS[0]), (1, ROWS[1])]


@pytest.mark.parametrize("text", [
    json.dumps(ROWS),                         # array
    json.dumps(ROWS, indent=2),               # pretty array
    jsonl(ROWS).decode(),                     # object per line despite the .json name
])
def test_json_array_or_lines(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_text(text, encoding="utf-8")
    assert records(path) == list(enumerate(ROWS))


@pytest.mark.parametrize("text", [json.dumps(ROWS[0]), json.dumps(ROWS[0], indent=2) + "\n\n"])
def test_json_single_object(tmp_path, text):
    path = tmp_path / "one.json"
    path.write_text(text, encoding="utf-8")
    assert records(path) == [(0, ROWS[0])]


def test_json_array_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([ROWS[0], "oops"]), encoding="utf-8")
    assert records(path) == [(0, ROWS[0]), (1, RawError("record is not a JSON object (got str)", '"oops"'))]


def test_json_lines_with_a_bad_first_line_keep_the_good_ones(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{"broken": \n' + jsonl(ROWS[:1]))
    out = records(path)
    assert isinstance(out[0][1], RawError) and out[1] == (1, ROWS[0])


def test_malformed_json_array_is_unreadable(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"a": 1}, {"b": ', encoding="utf-8")
    with pytest.raises(UnreadableFile, match=r"bad\.json: malformed JSON: Expecting value \(line 1 col 18\)"):
        read_records(path)


@pytest.mark.parametrize("name", ["x.jsonl.gz", "x.json.gz"])
def test_gzip_json(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(jsonl(ROWS)))
    assert records(path) == list(enumerate(ROWS))


def test_corrupt_gzip_is_unreadable(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(jsonl(ROWS))  # plain text under a .gz name
    with pytest.raises(UnreadableFile, match=r"x\.jsonl\.gz: not a valid gzip stream"):
        read_records(path)
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(jsonl(ROWS * 100))[:-40])
    with pytest.raises(UnreadableFile, match=r"t\.jsonl\.gz: "):
        records(truncated)


def _table() -> pa.Table:
    return pa.Table.from_pylist(ROWS)


def test_parquet_in_batches(tmp_path, monkeypatch):
    import curate.io.readers as readers

    monkeypatch.setattr(readers, "BATCH_ROWS", 2)
    path = tmp_path / "x.parquet"
    pq.write_table(pa.concat_tables([_table()] * 3), path, row_group_size=2)
    assert records(path) == list(enumerate(ROWS * 3))


def test_parquet_gz(tmp_path):
    plain = tmp_path / "x.parquet"
    pq.write_table(_table(), plain)
    path = tmp_path / "y.parquet.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    assert records(path) == list(enumerate(ROWS))


def _write_arrow(path: Path, kind: str) -> None:
    table = _table()
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_file if kind == "file" else pa.ipc.new_stream
        with writer(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_arrow_stream_and_file(tmp_path, kind):
    path = tmp_path / f"{kind}.arrow"
    _write_arrow(path, kind)
    assert path.read_bytes().startswith(b"ARROW1") == (kind == "file")
    assert records(path) == list(enumerate(ROWS))
    gz = tmp_path / f"{kind}.arrow.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert records(gz) == list(enumerate(ROWS))


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert records(tmp_path / "one") == list(enumerate(ROWS))
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    # the train split by default; with split="all" every split in name order, the index continuing
    assert records(tmp_path / "dict") == list(enumerate(ROWS))
    assert list(read_records(tmp_path / "dict", split="all")) == list(enumerate(ROWS[:1] + ROWS))


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.parquet", "e.arrow", "e.jsonl.gz", "e.parquet.gz"])
def test_zero_byte_file_yields_nothing(tmp_path, name):
    path = tmp_path / name
    path.touch()
    assert records(path) == []


@pytest.mark.parametrize(("name", "why"), [
    ("c.parquet", "not a Parquet file"), ("c.arrow", "not an Arrow IPC file or stream")])
def test_corrupt_columnar_file_is_unreadable(tmp_path, name, why):
    path = tmp_path / name
    path.write_bytes(b"this is not columnar data at all" * 4)
    with pytest.raises(UnreadableFile) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}: {why} (") and e.value.path == str(path)


def test_unreadable_paths(tmp_path):
    with pytest.raises(UnreadableFile, match="missing.jsonl: no such file or folder"):
        list_input_files([tmp_path / "missing.jsonl"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UnreadableFile, match=r"notes\.txt: unsupported file type \(supported: \.jsonl, "):
        list_input_files([tmp_path / "notes.txt"])
    with pytest.raises(UnreadableFile, match="unsupported file type"):
        read_records(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnreadableFile, match="empty: folder has no input files"):
        list_input_files([tmp_path / "empty"])


def test_permission_denied_is_unreadable(tmp_path, monkeypatch):
    import curate.io.readers as readers

    path = tmp_path / "secret.jsonl"
    path.write_bytes(jsonl(ROWS))

    def denied(file, *args, **kwargs):  # chmod 000 does not stop root, so deny the open itself
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(readers, "open", denied, raising=False)
    with pytest.raises(UnreadableFile, match=r"secret\.jsonl: cannot read \(Permission denied\)"):
        read_records(path)


def test_jsonl_is_streamed(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(jsonl(ROWS))
    stream = read_records(path)
    assert next(stream) == (0, ROWS[0])
    with open(path, "ab") as f:  # lines are read as they are reached, not up front
        f.write(jsonl([{"late": True}]))
    assert [i for i, _ in stream] == [1, 2, 3]


def test_list_input_files_order_skips_and_hf_units(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "in"
    for rel in ["b.jsonl", "a/z.json", "a/y.parquet.gz", "c/d/e.arrow", "a.jsonl", "license_plates.jsonl"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}\n")
    for rel in [".hidden.jsonl", ".git/x.jsonl", "README.md", "README.json", "SOURCE.md", "LICENSE", "LICENSE.jsonl",
                "notes.txt", "x.csv"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}\n")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(root / "c" / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(root / "hfdict"))
    single = tmp_path / "single.jsonl"
    single.write_text("{}\n")

    listed = list_input_files([single, root, root / "b.jsonl"])  # b.jsonl again: listed once
    assert [p.relative_to(tmp_path).as_posix() for p in listed] == [
        "single.jsonl", "in/a.jsonl", "in/a/y.parquet.gz", "in/a/z.json", "in/b.jsonl",
        "in/c/d/e.arrow", "in/c/hf", "in/hfdict/train", "in/license_plates.jsonl",
    ]
    assert list_input_files([root / "hfdict"]) == [root / "hfdict" / "train"]  # a DatasetDict: its split
    assert list_input_files([root / "c", single]) == [root / "c" / "d" / "e.arrow", root / "c" / "hf", single]
