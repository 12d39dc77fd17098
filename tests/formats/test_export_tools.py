"""`curate export` of tool conversations: a routed folder with τ-bench-like rows (ids, parallel calls,
text + calls + reasoning in one turn), glaive-like rows (no call ids, no tool names) and plain rows,
re-read from every target and turned back into canonical messages.

Each export gives back the routed rows' messages (compacted, SFT trimmed) and `tools`, up to what the
target documents: LLaMA-Factory's ShareGPT has no call ids and no tool-turn names, writes arguments as
JSON objects and joins consecutive tool results. Plain data exports exactly as it did before messages
had tool fields."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.formats.export import TARGETS, export, llamafactory
from curate.io.atomic import file_sha256, read_arrow, write_arrow
from curate.messages import compact, compact_all, dump_tools, for_template
from tests.formats.test_exports import jsonl, routed_row, write_routed

OPTIONAL = ("tool_calls", "tool_call_id", "name", "reasoning_content")


def m(role: str, content: str, **fields) -> dict:
    """A message as an Arrow row holds it: every optional field, null where the message has none."""
    return {"role": role, "content": content, **{k: fields.get(k) for k in OPTIONAL}}


def call(call_id: str | None, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def fn(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()},
                       "required": list(params)}}}


TAU_TOOLS = dump_tools([fn("get_user_details", "Get the details of a user.", user_id="string"),
                        fn("search_direct_flight", "Search direct flights.", origin="string",
                           destination="string", date="string")])
TAU = [  # τ-bench airline: OpenAI tool_calls with ids (content null -> ""), tool turns with id and name
    m("system", "You are an airline agent. Follow the policy."),
    m("user", "I want to fly from JFK to SFO on May 20. My user id is mia_li_3668."),
    m("assistant", "", tool_calls=[call("call_1", "get_user_details", '{"user_id": "mia_li_3668"}')]),
    m("tool", '{"name": "Mia Li", "membership": "gold"}', tool_call_id="call_1", name="get_user_details"),
    m("assistant", "Let me look up both days.", reasoning_content="Gold member; check the 20th and the 21st.",
      tool_calls=[call("call_2", "search_direct_flight", '{"origin":"JFK","destination":"SFO","date":"2024-05-20"}'),
                  call("call_3", "search_direct_flight", '{"origin":"JFK","destination":"SFO","date":"2024-05-21"}')]),
    m("tool", '[{"flight_number": "HAT023"}]', tool_call_id="call_2", name="search_direct_flight"),
    m("tool", "[]", tool_call_id="call_3", name="search_direct_flight"),
    m("assistant", "HAT023 leaves JFK on May 20. Shall I book it?"),
    m("user", "Yes, please."),                                   # trailing user turn: SFT drops it
]
GLAIVE_TOOLS = dump_tools([fn("convert_currency", "Convert an amount between currencies.", amount="number",
                              from_currency="string", to_currency="string")])
GLAIVE = [  # glaive / LLaMA-Factory ShareGPT: function_call and observation turns, no ids, no names
    m("user", "Convert 100 USD to EUR."),
    m("assistant", "", tool_calls=[call(None, "convert_currency",
                                        '{"amount": 100, "from_currency": "USD", "to_currency": "EUR"}')]),
    m("tool", '{"converted_amount": 85.3}'),
    m("assistant", "100 USD is about 85.30 EUR."),
]
PLAIN = [m("user", "2+2?"), m("assistant", "4")]
TAU_SFT = TAU[:-1]

PAIRS_SCHEMA = pa.schema([("id", pa.string()), ("prompt", schema.MESSAGES), ("chosen", schema.MESSAGES),
                          ("rejected", schema.MESSAGES), ("tools", pa.string()),
                          ("ref_chosen_logps", pa.float64()), ("ref_rejected_logps", pa.float64())])
PAIRS = [
    {"id": "p0", "prompt": GLAIVE[:1], "chosen": GLAIVE[1:2], "rejected": [m("assistant", "I cannot do that.")],
     "tools": GLAIVE_TOOLS, "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
    {"id": "p1", "prompt": PLAIN[:1], "chosen": PLAIN[1:], "rejected": [m("assistant", "5")], "tools": None,
     "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
]


def tool_rows() -> dict[str, list[list[dict]]]:
    """sft and rl partitions, two shards each: tool rows with ids in one shard, without in the other."""
    sft = [[routed_row(0, TAU, "sft", tools=TAU_TOOLS, reward=1.0), routed_row(1, PLAIN, "sft", ground_truth="4")],
           [routed_row(2, GLAIVE, "sft", tools=GLAIVE_TOOLS)]]
    rl = [[routed_row(3, TAU, "rl", tools=TAU_TOOLS, reward=0.0)],
          [routed_row(4, GLAIVE, "rl", tools=GLAIVE_TOOLS), routed_row(5, PLAIN, "rl", ground_truth="4")]]
    return {"sft": sft, "rl": rl}


@pytest.fixture
def tool_routed(tmp_path) -> Path:
    folder = write_routed(tmp_path / "routed", tool_rows(), schema.arrow_schema(schema.ROUTED))
    for k, rows in enumerate([PAIRS[:1], PAIRS[1:]]):   # pairs/ as `curate irft` writes it, in two shards
        write_arrow(folder / "pairs" / f"part-{k:05d}.arrow", pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))
    return folder


def routed(folder: Path, part: str) -> list[dict]:
    return [r for f in sorted((folder / part).glob("*.arrow")) for r in read_arrow(f).to_pylist()]


def sft_messages(row: dict) -> list[dict]:
    """What an SFT export holds for a routed row: compacted, up to the last assistant turn."""
    msgs = compact_all(row["messages"])
    return msgs[:max(i for i, x in enumerate(msgs) if x["role"] == "assistant") + 1]


def struct_fields(table: pa.Table, column: str) -> list[str]:
    return [f.name for f in table.schema.field(column).type.value_type]


# --- Arrow / Parquet: message struct fields follow the data -------------------------------------------

def test_arrow_keeps_the_tool_fields_the_partition_uses(tool_routed, tmp_path):
    export(tool_routed, "trl", tmp_path / "trl")
    sft = read_arrow(tmp_path / "trl/sft.arrow")
    rl = read_arrow(tmp_path / "trl/rl.arrow")
    pairs = read_arrow(tmp_path / "trl/pairs.arrow")
    assert struct_fields(sft, "messages") == ["role", "content", *OPTIONAL]
    assert struct_fields(rl, "prompt") == ["role", "content"]                    # prompts have no tool fields
    assert struct_fields(rl, "messages") == ["role", "content", *OPTIONAL]
    assert struct_fields(pairs, "chosen") == ["role", "content", "tool_calls"]  # only what a chosen reply has
    assert struct_fields(pairs, "rejected") == ["role", "content"]
    export(tool_routed, "verl", tmp_path / "verl")
    assert struct_fields(pq.read_table(tmp_path / "verl/rl.parquet"), "prompt") == ["role", "content"]
    assert struct_fields(pq.read_table(tmp_path / "verl/sft.parquet"), "messages") == ["role", "content", *OPTIONAL]


@pytest.mark.parametrize("to", sorted(TARGETS))
def test_plain_data_exports_as_before_tool_fields_existed(tmp_path, to):
    """The same tool-free rows, once with the tool-aware message struct and once with the old
    {role, content} one, give byte-identical files."""
    old_message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    full = schema.arrow_schema(schema.ROUTED)
    old = pa.schema([f.with_type(old_message) if f.type == schema.MESSAGES else f for f in full])
    rows = {"sft": [[routed_row(0, PLAIN, "sft", ground_truth="4")]], "rl": [[routed_row(1, PLAIN, "rl")]]}
    export(write_routed(tmp_path / "new", rows, full), to, tmp_path / "new_out")
    export(write_routed(tmp_path / "old", rows, old), to, tmp_path / "old_out")
    names = sorted(p.name for p in (tmp_path / "old_out").iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in (tmp_path / "new_out").iterdir() if p.name != "manifest.json")
    for name in names:
        assert file_sha256(tmp_path / "new_out" / name) == file_sha256(tmp_path / "old_out" / name), name


# --- round trips ----------------------------------------------------------------------------------------

def test_trl_round_trip(tool_routed, tmp_path):
    export(tool_routed, "trl", tmp_path / "trl")
    sft = read_arrow(tmp_path / "trl/sft.arrow").to_pylist()
    want = routed(tool_routed, "sft")
    assert [compact_all(r["messages"]) for r in sft] == [sft_messages(r) for r in want]
    assert compact_all(sft[0]["messages"]) == compact_all(TAU_SFT)
    assert [r["tools"] for r in sft] == [TAU_TOOLS, None, GLAIVE_TOOLS]          # SFTTrainer reads `tools`
    assert "prompt" not in sft[0]
    rl = read_arrow(tmp_path / "trl/rl.arrow").to_pylist()
    assert [r["prompt"] for r in rl] == [compact_all(r["prompt"]) for r in routed(tool_routed, "rl")]
    assert rl[0]["prompt"] == compact_all(TAU[:2])                                # the system turn stays
    assert [r["tools"] for r in rl] == [TAU_TOOLS, GLAIVE_TOOLS, None]
    pairs = read_arrow(tmp_path / "trl/pairs.arrow").to_pylist()
    assert [compact_all(r["chosen"]) for r in pairs] == [compact_all(p["chosen"]) for p in PAIRS]
    assert [r["tools"] for r in pairs] == [p["tools"] for p in PAIRS]


def test_verl_round_trip(tool_routed, tmp_path):
    m_ = export(tool_routed, "verl", tmp_path / "verl")
    assert "pairs" in m_["skipped"]
    rl = pq.read_table(tmp_path / "verl/rl.parquet").to_pylist()
    want = routed(tool_routed, "rl")
    assert [compact_all(r["prompt"]) for r in rl] == [compact_all(r["prompt"]) for r in want]
    assert [r["extra_info"]["tools"] for r in rl] == [TAU_TOOLS, GLAIVE_TOOLS, None]
    assert [r["extra_info"]["tool_selection"] for r in rl] == [["get_user_details", "search_direct_flight"],
                                                               ["convert_currency"], None]
    assert [json.loads(r["extra_info"]["tools"]) for r in rl[:2]] == [json.loads(TAU_TOOLS), json.loads(GLAIVE_TOOLS)]
    sft = pq.read_table(tmp_path / "verl/sft.parquet").to_pylist()
    assert [compact_all(r["messages"]) for r in sft] == [sft_messages(r) for r in routed(tool_routed, "sft")]
    assert [r["tools"] for r in sft] == [TAU_TOOLS, None, GLAIVE_TOOLS]


def test_openrlhf_round_trip(tool_routed, tmp_path):
    export(tool_routed, "openrlhf", tmp_path / "o")
    sft = jsonl(tmp_path / "o/sft.jsonl")
    want = routed(tool_routed, "sft")
    assert [r["messages"] for r in sft] == [sft_messages(r) for r in want]      # compacted: no null fields
    assert sft[0]["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_user_details",
                                                          "arguments": '{"user_id": "mia_li_3668"}'}}]}
    assert sft[1]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert all(r["input"] + r["output"] == r["messages"] for r in sft)
    assert [r["tools"] for r in sft] == [TAU_TOOLS, None, GLAIVE_TOOLS]
    rl = jsonl(tmp_path / "o/rl.jsonl")
    assert [r["input"] for r in rl] == [compact_all(r["prompt"]) for r in routed(tool_routed, "rl")]
    assert [r["tools"] for r in rl] == [TAU_TOOLS, GLAIVE_TOOLS, None]
    pairs = jsonl(tmp_path / "o/pairs.jsonl")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs] == \
           [(compact_all(p["prompt"]), compact_all(p["chosen"]), compact_all(p["rejected"])) for p in PAIRS]


# --- LLaMA-Factory: ShareGPT tags, turned back into messages ----------------------------------------------

def from_sharegpt(system: str, turns: list[dict]) -> list[dict]:
    """ShareGPT turns as written by the export -> messages (for_template form: arguments as objects)."""
    think, (open_, close) = llamafactory.THOUGHT, llamafactory.TOOL_CALL
    out = [{"role": "system", "content": system}] if system else []
    for t in turns:
        tag, value = t["from"], t["value"]
        if tag in ("human", "observation"):
            out.append({"role": "user" if tag == "human" else "tool", "content": value})
            continue
        msg = {"role": "assistant"}
        if value.startswith(think[0]) and think[1] in value:
            msg["reasoning_content"], value = value[len(think[0]):].split(think[1], 1)
        if tag == "function_call":
            text, calls = value[:-len(close)].split(open_, 1) if open_ in value else ("", value)
            calls = json.loads(calls)
            calls = calls if isinstance(calls, list) else [calls]
            msg["tool_calls"] = [{"type": "function", "function": c} for c in calls]
            value = text
        msg["content"] = value
        out.append(msg)
    return out


def sharegpt_view(messages: list[dict]) -> list[dict]:
    """What LLaMA-Factory's ShareGPT keeps of messages (docs/exports.md): arguments as JSON objects, no
    call ids, no tool_call_id / name on tool turns, consecutive user/tool turns joined by a blank line."""
    out = []
    for x in for_template(messages):
        x = {k: v for k, v in x.items() if not (x["role"] == "tool" and k in ("tool_call_id", "name"))}
        if "tool_calls" in x:
            x["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in x["tool_calls"]]
        if out and x["role"] in ("user", "tool") and out[-1]["role"] in ("user", "tool"):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + x["content"]}
        else:
            out.append(x)
    return out


def test_llamafactory_round_trip(tool_routed, tmp_path):
    export(tool_routed, "llamafactory", tmp_path / "lf")
    sft = jsonl(tmp_path / "lf/sft.jsonl")
    want = routed(tool_routed, "sft")
    assert [from_sharegpt(r["system"], r["conversations"]) for r in sft] == \
           [sharegpt_view(sft_messages(r)) for r in want]
    assert [r["tools"] for r in sft] == [TAU_TOOLS, None, GLAIVE_TOOLS]
    rl = jsonl(tmp_path / "lf/rl.jsonl")
    want_rl = routed(tool_routed, "rl")
    assert [from_sharegpt(r["system"], r["conversations"]) for r in rl] == \
           [sharegpt_view(compact_all(r["messages"][:len(r["prompt"]) + 1])) for r in want_rl]
    pairs = jsonl(tmp_path / "lf/pairs.jsonl")
    assert [from_sharegpt("", [r["chosen"]])[0] for r in pairs] == [sharegpt_view(p["chosen"])[0] for p in PAIRS]
    assert [r["tools"] for r in pairs] == [GLAIVE_TOOLS, None]


def test_llamafactory_tool_turns_as_written(tool_routed, tmp_path):
    export(tool_routed, "llamafactory", tmp_path / "lf")
    tau, plain, glaive = jsonl(tmp_path / "lf/sft.jsonl")
    assert tau["system"] == "You are an airline agent. Follow the policy."
    assert [t["from"] for t in tau["conversations"]] == \
           ["human", "function_call", "observation", "function_call", "observation", "gpt"]
    assert tau["conversations"][1]["value"] == '{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}'
    assert tau["conversations"][3]["value"] == (
        "<think>\nGold member; check the 20th and the 21st.\n</think>\n\nLet me look up both days.<tool_call>"
        '[{"name": "search_direct_flight", "arguments": {"origin": "JFK", "destination": "SFO", "date": "2024-05-20"}}, '
        '{"name": "search_direct_flight", "arguments": {"origin": "JFK", "destination": "SFO", "date": "2024-05-21"}}]'
        "</tool_call>")
    assert tau["conversations"][4]["value"] == '[{"flight_number": "HAT023"}]\n\n[]'   # parallel results joined
    assert glaive["conversations"][1] == {"from": "function_call", "value": (
        '{"name": "convert_currency", "arguments": {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}}')}
    assert plain["conversations"] == [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    info = json.loads((tmp_path / "lf/dataset_info.json").read_text())
    for name in ("curate_sft", "curate_rl", "curate_pairs"):
        assert info[name]["columns"]["tools"] == "tools" and info[name]["tags"]["function_tag"] == "function_call"
    assert info["curate_pairs"]["ranking"] is True


@pytest.mark.parametrize("turns, reason", [
    ([m("assistant", "", tool_calls=[call("c", "f", "{}")]), m("assistant", "and some text")],
     llamafactory.TEXT_AFTER_CALLS),
    ([m("assistant", "see <tool_call>", tool_calls=[call("c", "f", "{}")])], llamafactory.CALL_MARKER),
    ([m("assistant", "", tool_calls=[call("c", "f", '{"city": "Par')])], llamafactory.ARGS_NOT_JSON),
])
def test_llamafactory_skips_what_sharegpt_cannot_hold(tmp_path, turns, reason):
    rows = [routed_row(7, [m("user", "go")] + turns, "sft", tools=GLAIVE_TOOLS),
            routed_row(8, GLAIVE, "sft", tools=GLAIVE_TOOLS)]
    folder = write_routed(tmp_path / "r", {"sft": [rows]}, schema.arrow_schema(schema.ROUTED))
    lf = export(folder, "llamafactory", tmp_path / "lf")
    assert lf["rows_skipped"]["by_partition"] == {"sft": {reason: 1}} and lf["counts"] == {"sft": 1}
    assert [e["id"] for e in lf["rows_skipped"]["examples"]["sft"]] == ["id7"]
    assert [r["id"] for r in jsonl(tmp_path / "lf/sft.jsonl")] == ["id8"]
    export(folder, "trl", tmp_path / "trl")          # the other targets keep such turns as they are
    assert compact_all(read_arrow(tmp_path / "trl/sft.arrow").column("messages").to_pylist()[0])[1:] == \
           [compact(t) for t in turns]


def test_llamafactory_writes_arguments_as_the_json_value_they_hold(tmp_path):
    """Arguments that are JSON but not an object are written as that value (LLaMA-Factory `json.dumps` it
    back to the same JSON), not as a string it would quote."""
    rows = [routed_row(0, [m("user", "go"), m("assistant", "", tool_calls=[call("c", "f", "[1, 2]")])], "sft")]
    export(write_routed(tmp_path / "r", {"sft": [rows]}, schema.arrow_schema(schema.ROUTED)), "llamafactory",
           tmp_path / "lf")
    assert jsonl(tmp_path / "lf/sft.jsonl")[0]["conversations"][1] == \
           {"from": "function_call", "value": '{"name": "f", "arguments": [1, 2]}'}


def test_pairs_prompt_is_stripped_when_the_columns_differ_in_fields(tmp_path):
    """`chosen` repeating the prompt is recognised even when its struct has tool fields the prompt lacks."""
    rows = [{"id": "p", "prompt": GLAIVE[:1], "chosen": GLAIVE[:2], "rejected": GLAIVE[:1] + [m("assistant", "no")],
             "tools": GLAIVE_TOOLS, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}]
    write_arrow(tmp_path / "irft/pairs/part-00000.arrow", pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA))
    write_routed(tmp_path / "irft", {})
    export(tmp_path / "irft", "trl", tmp_path / "trl")
    t = read_arrow(tmp_path / "trl/pairs.arrow").to_pylist()[0]
    assert compact_all(t["chosen"]) == compact_all(GLAIVE[1:2])
    assert t["rejected"] == [{"role": "assistant", "content": "no"}]
