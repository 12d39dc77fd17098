"""Exports never abort on one row: a routed folder with good rows and one bad row per kind, exported to
every target. The files are written, the good rows are all there (unchanged), each bad row is counted
under its reason and named in the manifest, and per partition rows in = rows written + rows skipped.

Every target skips a row that breaks the message contract (schemas/record.schema.json) or that its
partition's conventions need (an SFT row with no assistant turn, an RL row with no prompt, a pair side
that is not a reply); LLaMA-Factory also skips the rows its ShareGPT cannot hold, which the other
targets write as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.formats.export import TARGETS, common, export, llamafactory as lf
from curate.io.atomic import read_arrow, write_arrow
from curate.messages import compact_all
from tests.formats.test_export_tools import GLAIVE, GLAIVE_TOOLS, PAIRS_SCHEMA, call, m
from tests.formats.test_exports import jsonl, write_routed

PLAIN = [m("user", "2+2?"), m("assistant", "4")]
CALLS = [m("user", "go")]


def row(i: int, messages: list, prompt=..., **extra) -> dict:
    """A routed row; `prompt` defaults to the messages before the first assistant turn."""
    if prompt is ...:
        first = next((k for k, x in enumerate(messages) if x and x["role"] == "assistant"), len(messages))
        prompt = messages[:first]
    return {"id": f"id{i}", "source": "in.jsonl", "source_index": i, "format": "messages", "messages": messages,
            "prompt": prompt, "n_tokens": 10, "n_loss_tokens": 4, "route": "sft", "ground_truth": None, **extra}


# Rows no target can write: {reason: messages (or a row)}
SFT_BAD_EVERYWHERE = {
    common.NULL_MESSAGE: [m("user", "q"), None, m("assistant", "a")],
    common.UNKNOWN_ROLE: [m("developer", "be brief"), m("user", "q"), m("assistant", "a")],
    common.NO_CONTENT: [m("user", None), m("assistant", "a")],
    common.BAD_CALL: CALLS + [m("assistant", "", tool_calls=[call("c", None, "{}")])],
    common.BAD_TOOLS: PLAIN,                                       # with tools="not json"
    common.NO_ASSISTANT: [m("user", "q"), m("user", "anyone?")],
}
# Rows only LLaMA-Factory cannot write (the others keep them as they are)
SFT_BAD_FOR_LF = {
    lf.MID_SYSTEM: [m("user", "q"), m("assistant", "a"), m("system", "Now answer in French."), m("user", "q2"),
                    m("assistant", "r")],
    lf.NOT_USER_FIRST: [m("assistant", "Hello, how can I help?"), m("user", "q"), m("assistant", "a")],
    lf.TEXT_AFTER_CALLS: CALLS + [m("assistant", "", tool_calls=[call("c", "f", "{}")]), m("assistant", "done")],
    lf.CALL_MARKER: CALLS + [m("assistant", "see </tool_call>", tool_calls=[call("c", "f", "{}")])],
    lf.ARGS_NOT_JSON: CALLS + [m("assistant", "", tool_calls=[call("c", "f", '{"city": "Par')])],
    lf.ARGS_SURROGATE: CALLS + [m("assistant", "", tool_calls=[call("c", "f", '{"s": "\\ud800"}')])],
}
SYSTEMS = [m("system", "You are terse."), m("system", "Answer in English.")] + PLAIN
JOINED = [m("user", "q"), m("tool", "r1"), m("tool", "r2"), m("assistant", "a"), m("assistant", "b")]


def sft_rows() -> list[list[dict]]:
    """Two shards: bad rows between good ones."""
    bad = [row(10 + k, msgs, tools="not json" if reason == common.BAD_TOOLS else None)
           for k, (reason, msgs) in enumerate({**SFT_BAD_EVERYWHERE, **SFT_BAD_FOR_LF}.items())]
    good = [row(0, PLAIN), row(1, GLAIVE, tools=GLAIVE_TOOLS), row(2, SYSTEMS), row(3, JOINED)]
    return [good[:1] + bad[:6], bad[6:] + good[1:]]


RL_BAD_EVERYWHERE = {common.EMPTY_PROMPT: [row(20, PLAIN, prompt=[]), row(21, PLAIN, prompt=None)]}
RL_BAD_FOR_LF = {
    lf.RL_NO_REPLY: row(22, [m("user", "q"), m("user", "more"), m("assistant", "a")], prompt=[m("user", "q")]),
    lf.MID_SYSTEM: row(23, [m("user", "q"), m("system", "s"), m("user", "q2"), m("assistant", "a")]),
}


def rl_rows() -> list[list[dict]]:
    bad = [*RL_BAD_EVERYWHERE[common.EMPTY_PROMPT], *RL_BAD_FOR_LF.values()]
    return [bad, [row(4, PLAIN, ground_truth="4"), row(5, GLAIVE, tools=GLAIVE_TOOLS)]]


def pair(i: int, prompt: list, chosen: list, rejected: list) -> dict:
    return {"id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": None,
            "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}


PAIRS_BAD_EVERYWHERE = {common.PAIR_NOT_ASSISTANT.format("rejected"):
                        pair(30, PLAIN[:1], PLAIN[1:], [m("user", "not a reply")])}
PAIRS_BAD_FOR_LF = {
    lf.PAIR_PROMPT_END: pair(31, PLAIN, [m("assistant", "yes")], [m("assistant", "no")]),
    lf.PAIR_SIDE.format("chosen"): pair(32, GLAIVE[:1], GLAIVE[1:], [m("assistant", "no")]),
}
GOOD_PAIRS = [pair(0, PLAIN[:1], PLAIN[1:], [m("assistant", "5")])]


@pytest.fixture
def bad_routed(tmp_path) -> Path:
    folder = write_routed(tmp_path / "routed", {"sft": sft_rows(), "rl": rl_rows()}, schema.arrow_schema(schema.ROUTED))
    rows = [*GOOD_PAIRS, *PAIRS_BAD_EVERYWHERE.values(), *PAIRS_BAD_FOR_LF.values()]
    write_arrow(folder / "pairs/part-00000.arrow", pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))
    return folder


def expected_skips(to: str) -> dict[str, dict[str, int]]:
    sft = {r: 1 for r in SFT_BAD_EVERYWHERE}
    rl = {common.EMPTY_PROMPT: 2}
    pairs = {r: 1 for r in PAIRS_BAD_EVERYWHERE}
    if to == "llamafactory":
        sft |= {r: 1 for r in SFT_BAD_FOR_LF}
        rl |= {r: 1 for r in RL_BAD_FOR_LF}
        pairs |= {r: 1 for r in PAIRS_BAD_FOR_LF}
    out = {"sft": sft, "rl": rl, "pairs": pairs}
    return {p: dict(sorted(c.items())) for p, c in out.items() if p in TARGETS[to].PARTITIONS}


def written_ids(folder: Path, name: str) -> list[str]:
    path = folder / name
    if path.suffix == ".arrow":
        return read_arrow(path).column("id").to_pylist()
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        if "id" in t.column_names:
            return t.column("id").to_pylist()
        return [e["id"] for e in t.column("extra_info").to_pylist()]
    return [r["id"] for r in jsonl(path)]


@pytest.mark.parametrize("to", sorted(TARGETS))
def test_bad_rows_are_skipped_and_counted(bad_routed, tmp_path, to):
    m_ = export(bad_routed, to, tmp_path / to)
    want = expected_skips(to)
    assert m_["rows_skipped"]["by_partition"] == want
    assert m_["rows_skipped"]["total"] == sum(sum(c.values()) for c in want.values())
    for part, count in m_["counts"].items():          # every row is written or counted
        assert m_["rows_in"][part] == count + sum(want[part].values())
        assert m_["files"][f"{part}.{TARGETS[to].EXT}"]["rows"] == count
    assert m_["rows_in"] == {p: {"sft": 16, "rl": 6, "pairs": 4}[p] for p in want}
    # each skipped row is named with its shard and record, in shard order
    named = {(e["reason"], e["id"]) for p in want for e in m_["rows_skipped"]["examples"][p]}
    assert len(named) == m_["rows_skipped"]["total"]
    ex = m_["rows_skipped"]["examples"]["sft"][0]
    assert ex == {"reason": common.NULL_MESSAGE, "shard": "sft/part-00000.arrow", "id": "id10", "source": "in.jsonl",
                  "source_index": 10}
    # the good rows are all written, in order (and, for the other targets, the rows only LLaMA-Factory skips)
    out = tmp_path / to
    lf_only = to != "llamafactory"
    assert written_ids(out, f"sft.{TARGETS[to].EXT}") == \
        ["id0"] + ([f"id{i}" for i in range(16, 22)] if lf_only else []) + ["id1", "id2", "id3"]
    assert written_ids(out, f"rl.{TARGETS[to].EXT}") == (["id22", "id23"] if lf_only else []) + ["id4", "id5"]
    if "pairs" in want:
        assert written_ids(out, f"pairs.{TARGETS[to].EXT}") == ["p0"] + (["p31", "p32"] if lf_only else [])
    else:
        assert "pairs" in m_["skipped"]                 # verl: no pairs trainer, the partition is not read


@pytest.mark.parametrize("to", sorted(TARGETS))
def test_good_rows_are_written_as_without_the_bad_ones(bad_routed, tmp_path, to):
    """Skipping rows changes nothing in the others: the same files as from a folder holding only the rows
    written (message struct fields and registered columns come from the rows written)."""
    export(bad_routed, to, tmp_path / "bad")
    clean, ext = tmp_path / "clean", TARGETS[to].EXT
    for part in TARGETS[to].PARTITIONS:
        keep = set(written_ids(tmp_path / "bad", f"{part}.{ext}"))
        for shard in sorted((bad_routed / part).glob("*.arrow")):
            table = read_arrow(shard)
            kept = pa.array([i in keep for i in table.column("id").to_pylist()])
            write_arrow(clean / part / shard.name, table.filter(kept))
    (clean / "manifest.json").write_text((bad_routed / "manifest.json").read_text())
    m_ = export(clean, to, tmp_path / "clean_out")
    assert m_["rows_skipped"]["total"] == 0
    names = sorted(p.name for p in (tmp_path / "bad").iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in (tmp_path / "clean_out").iterdir() if p.name != "manifest.json")
    for name in names:
        assert (tmp_path / "clean_out" / name).read_bytes() == (tmp_path / "bad" / name).read_bytes(), name


def test_written_rows_keep_their_content(bad_routed, tmp_path):
    export(bad_routed, "openrlhf", tmp_path / "o")
    sft = {r["id"]: r for r in jsonl(tmp_path / "o/sft.jsonl")}
    assert sft["id1"]["messages"] == compact_all(GLAIVE) and sft["id0"]["messages"] == compact_all(PLAIN)
    # arguments that are not JSON are kept as given where messages stay messages
    assert sft["id20"]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Par'
    assert sft["id21"]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"s": "\\ud800"}'
    export(bad_routed, "verl", tmp_path / "v")
    rl = pq.read_table(tmp_path / "v/rl.parquet").to_pylist()
    assert [r["extra_info"]["index"] for r in rl] == [0, 1, 2, 3]   # row numbers of the file, skips left out
    assert [r["extra_info"]["tool_selection"] for r in rl] == [None, None, None, ["convert_currency"]]


def test_llamafactory_rows_are_valid_sharegpt_and_folds_are_counted(bad_routed, tmp_path):
    m_ = export(bad_routed, "llamafactory", tmp_path / "lf")
    info = json.loads((tmp_path / "lf/dataset_info.json").read_text())
    for name, entry in info.items():                  # LLaMA-Factory's ShareGPT rules hold on every written row
        for r in jsonl(tmp_path / "lf" / entry["file_name"]):
            tags = [t["from"] for t in r["conversations"]]
            assert all(t in (("human", "observation"), ("gpt", "function_call"))[k % 2] for k, t in enumerate(tags))
            assert len(tags) % 2 == (1 if entry.get("ranking") else 0), (name, r["id"])
    sft = {r["id"]: r for r in jsonl(tmp_path / "lf/sft.jsonl")}
    assert sft["id2"]["system"] == "You are terse.\n\nAnswer in English."
    assert sft["id3"]["conversations"] == [{"from": "human", "value": "q\n\nr1\n\nr2"},
                                           {"from": "gpt", "value": "a\n\nb"}]
    assert m_["rows_folded"] == {"total": 2, "by_partition": {     # rows id2 and id3
        "pairs": {}, "rl": {}, "sft": {lf.JOIN_ASSISTANT: 1, lf.JOIN_SYSTEM: 1, lf.JOIN_USER: 1}}}


def test_only_the_first_records_of_a_reason_are_named(tmp_path):
    rows = [row(i, [m("user", "q")]) for i in range(common.EXAMPLES + 2)] + [row(99, PLAIN)]
    folder = write_routed(tmp_path / "r", {"sft": [rows]}, schema.arrow_schema(schema.ROUTED))
    m_ = export(folder, "trl", tmp_path / "trl")
    assert m_["rows_skipped"]["by_partition"] == {"sft": {common.NO_ASSISTANT: common.EXAMPLES + 2}}
    assert [e["id"] for e in m_["rows_skipped"]["examples"]["sft"]] == [f"id{i}" for i in range(common.EXAMPLES)]
    assert m_["counts"] == {"sft": 1} and m_["rows_in"] == {"sft": common.EXAMPLES + 3}


@pytest.mark.parametrize("to", sorted(TARGETS))
def test_a_partition_with_every_row_skipped_gives_an_empty_file(tmp_path, to):
    folder = write_routed(tmp_path / "r", {"sft": [[row(0, [m("user", "q")])]], "rl": [[row(1, PLAIN)]]},
                          schema.arrow_schema(schema.ROUTED))
    m_ = export(folder, to, tmp_path / to)
    assert m_["counts"] == {"sft": 0, "rl": 1} and m_["rows_in"] == {"sft": 1, "rl": 1}
    ext = TARGETS[to].EXT
    assert (tmp_path / to / f"sft.{ext}").exists() and written_ids(tmp_path / to, f"rl.{ext}") == ["id1"]


def test_a_shard_without_message_lists_is_an_error_not_a_skip(tmp_path):
    """Whole-shard problems (a missing column, a column of another type) still stop the export: they are
    not one odd row. An all-null column (a shard whose rows have no prompt) is rows with empty prompts."""
    folder = write_routed(tmp_path / "r", {"rl": [[{"id": "a", "prompt": "plain text"}]]})
    with pytest.raises(ValueError, match="rl/part-00000.arrow: column prompt must hold message lists"):
        export(folder, "trl", tmp_path / "o")
    folder = write_routed(tmp_path / "r2", {"rl": [[{"id": "a", "prompt": None}], [{"id": "b", "prompt": PLAIN[:1]}]]})
    m_ = export(folder, "trl", tmp_path / "o2")
    assert m_["counts"] == {"rl": 1} and m_["rows_skipped"]["by_partition"] == {"rl": {common.EMPTY_PROMPT: 1}}
