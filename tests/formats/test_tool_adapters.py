"""Tool-calling conversations at ingest: OpenAI tool_calls (τ-bench), ShareGPT function_call/observation
(LLaMA-Factory's glaive set), reasoning, role aliases. Nothing a record carries is dropped or mangled:
every field either reaches the canonical record or is named in a note."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from curate.formats.adapters import BadRecord, normalize, record_id
from curate.formats.tools import load_tools_file, parse_tools
from curate.messages import compact_all
from curate.ingest.ingest import IngestConfig, ingest

TOOLS_DATA = Path(__file__).resolve().parents[1] / "data" / "tools"
TAU = TOOLS_DATA / "tau_bench_airline.lines1-12.jsonl"
TAU_TOOLS = TOOLS_DATA / "airline_tools.json"
GLAIVE = TOOLS_DATA / "glaive_toolcall.records1-30.json"


def tau_records() -> list[dict]:
    return [json.loads(line) for line in TAU.read_text().splitlines()]


def expected_openai(messages: list[dict]) -> list[dict]:
    """The documented normalisation of OpenAI messages: null content is "", calls keep their fields."""
    out = []
    for m in messages:
        c = {"role": m["role"], "content": m["content"] or ""}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key):
                c[key] = m[key]
        out.append(c)
    return out


def ingested(paths: list[Path], tools: Path | None = None) -> tuple[pa.Table, object]:
    shards = []
    res = ingest(IngestConfig(inputs=[str(p) for p in paths], tools=str(tools) if tools else None),
                 lambda i, t: shards.append(t))
    return pa.concat_tables(shards), res


def test_tau_bench_round_trip_keeps_every_message_and_the_tools():
    table, res = ingested([TAU], tools=TAU_TOOLS)
    assert res.counts["quarantined"] == 0 and table.num_rows == 12
    tools_text = load_tools_file(str(TAU_TOOLS))
    for raw, row in zip(tau_records(), table.to_pylist()):
        assert row["format"] == "messages"
        got = compact_all(row["messages"])
        # call ids, arguments text and tool-result ids are kept exactly
        calls = [{**c, "function": dict(c["function"])} for m in got for c in m.get("tool_calls", [])]
        assert calls == [c for m in raw["traj"] for c in m.get("tool_calls") or []]
        assert got == [{k: (v if k != "tool_calls" else [{**c, "function": dict(c["function"])} for c in v])
                        for k, v in m.items()} for m in expected_openai(raw["traj"])]
        assert row["tools"] == tools_text and json.loads(row["tools"]) == json.loads(TAU_TOOLS.read_text())
        assert row["reward"] == raw["reward"]


def test_tools_file_inside_an_input_folder_is_not_read_as_data(tmp_path):
    (tmp_path / "data.jsonl").write_text(TAU.read_text().splitlines()[0] + "\n")
    (tmp_path / "tools.json").write_text(TAU_TOOLS.read_text())
    table, res = ingested([tmp_path], tools=tmp_path / "tools.json")
    assert res.counts == {**res.counts, "input": 1, "quarantined": 0} and table.num_rows == 1
    assert [f["path"] for f in res.files] == [str(tmp_path / "data.jsonl")]


def test_glaive_sharegpt_function_calls_and_tools():
    raws = json.loads(GLAIVE.read_text())
    table, res = ingested([GLAIVE])
    assert res.counts["quarantined"] == 0 and res.counts["input"] == len(raws)
    rows = {r["source_index"]: r for r in table.to_pylist()}
    roles = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    for i, raw in enumerate(raws):
        if i not in rows:  # an exact duplicate of an earlier record
            continue
        got = compact_all(rows[i]["messages"])
        assert [m["role"] for m in got] == [roles[t["from"]] for t in raw["conversations"]]
        for turn, m in zip(raw["conversations"], got):
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                assert m["content"] == "" and len(m["tool_calls"]) == 1
                fn = m["tool_calls"][0]["function"]
                assert fn["name"] == call["name"] and json.loads(fn["arguments"]) == call["arguments"]
            else:
                assert m["content"] == turn["value"] and "tool_calls" not in m
        schemas = json.loads(raw["tools"])  # "[]" (no tools) gives null
        assert json.loads(rows[i]["tools"] or "[]") == [{"type": "function", "function": s} for s in schemas]


def test_text_and_calls_both_kept_and_null_content_allowed():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    raw = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "{}"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": ""},
                        {"role": "assistant", "content": "done"}]}
    m = normalize(raw).messages
    assert m[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}
    assert m[3] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert m[2] == {"role": "tool", "content": "{}", "tool_call_id": "c1", "name": "f"}
    assert m[4] == {"role": "tool", "content": "", "tool_call_id": "c1"}


def test_arguments_given_as_an_object_are_written_as_json_text_in_their_order():
    raw = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"b": 1, "a": "é"}}}]}]}
    assert normalize(raw).messages[1]["tool_calls"][0]["function"]["arguments"] == '{"b": 1, "a": "é"}'


def test_reasoning_is_kept_and_in_the_id():
    base = [{"role": "user", "content": "2+2?"}]
    a = normalize({"messages": base + [{"role": "assistant", "content": "4", "reasoning_content": "2 and 2"}]})
    b = normalize({"messages": base + [{"role": "assistant", "content": "4", "reasoning_content": "two twos"}]})
    plain = normalize({"messages": base + [{"role": "assistant", "content": "4"}]})
    assert a.messages[1]["reasoning_content"] == "2 and 2"
    assert len({record_id(a), record_id(b), record_id(plain)}) == 3
    # a reasoning-only reply (content empty) is a demonstration, not an empty turn
    r = normalize({"messages": base + [{"role": "assistant", "content": "", "reasoning": "hmm"}]})
    assert r.messages[1] == {"role": "assistant", "content": "", "reasoning_content": "hmm"}


def test_tools_and_calls_are_in_the_id():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids = {record_id(normalize({"messages": msgs})),
           record_id(normalize({"messages": msgs, "tools": [{"name": "f", "parameters": {}}]})),
           record_id(normalize({"messages": msgs, "tools": [{"name": "g", "parameters": {}}]}))}
    assert len(ids) == 3


def test_blank_system_turn_is_kept_roles_case_insensitive_aliases_noted():
    raw = {"messages": [{"role": "System", "content": ""}, {"role": "USER", "content": "q"},
                        {"role": "Assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                        {"role": "function", "name": "f", "content": "1"},
                        {"role": "assistant", "content": "one", "weight": 0}]}
    n = normalize(raw)
    assert [m["role"] for m in n.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert n.messages[0]["content"] == "" and n.messages[2]["tool_calls"][0]["function"]["name"] == "f"
    assert n.notes == ("role 'function' read as 'tool'", "message field 'weight' not kept")


def test_hermes_tool_call_text_stays_text():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    n = normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]})
    assert n.messages[1] == {"role": "assistant", "content": text}


@pytest.mark.parametrize("raw, reason", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "message 1: no content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]},
     "message 1: tool call 0 has no function name"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"function": {"name": "f"}}]},
                   {"role": "assistant", "content": "a"}]}, "message 0: a user turn cannot have tool_calls"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[{"},
     "field 'tools' is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [{"x": 1}]},
     "tools item 0 is neither"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"}]},
     "message 1: function_call value is not JSON"),
])
def test_bad_tool_records_say_why(raw, reason):
    with pytest.raises(BadRecord, match=reason.replace("(", r"\(").replace("[", r"\[")):
        normalize(raw)


def test_parse_tools_accepts_text_lists_and_wrapped_schemas():
    wrapped = {"type": "function", "function": {"name": "f", "parameters": {}}}
    assert parse_tools(json.dumps([wrapped])) == parse_tools([{"name": "f", "parameters": {}}])
    assert parse_tools([]) is None and parse_tools("") is None and parse_tools("[]") is None


def test_tools_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"--tools {bad}"):
        load_tools_file(str(bad))


def chat_with(assistant: dict, **record) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, assistant], **record}


@pytest.mark.parametrize("call, reason", [
    ({"id": "c", "function": {"name": "f\ud800", "arguments": "{}"}}, "name has an unpaired surrogate"),
    ({"id": "c\udc00", "function": {"name": "f", "arguments": "{}"}}, "id has an unpaired surrogate"),
    ({"id": "c", "function": {"name": "f", "arguments": {"a": "\ud800"}}}, "arguments has an unpaired surrogate"),
    ({"id": True, "function": {"name": "f", "arguments": "{}"}}, "id must be a string or an integer, got bool"),
    ({"id": "c", "function": {"name": "f", "arguments": {"x": float("nan")}}}, "NaN or infinity"),
])
def test_bad_calls_are_refused_not_crashing(call, reason):
    """A call the canonical record cannot hold is a bad record (quarantined), never an error of the run."""
    with pytest.raises(BadRecord, match=reason):
        normalize(chat_with({"role": "assistant", "content": None, "tool_calls": [call]}))


def test_integer_ids_become_strings_and_names_are_kept_on_any_turn():
    raw = {"messages": [{"role": "user", "content": "q", "name": "alice"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"id": 7, "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                        {"role": "tool", "tool_call_id": 7, "content": "1"},
                        {"role": "assistant", "content": "one", "name": "bot"}]}
    m = normalize(raw).messages
    assert m[0]["name"] == "alice" and m[3]["name"] == "bot"
    assert m[1]["tool_calls"][0]["id"] == "7" and m[2]["tool_call_id"] == "7"


def test_what_cannot_be_kept_is_noted_and_null_fields_are_not():
    n = normalize(chat_with({"role": "assistant", "content": "a", "tool_call_id": "x", "refusal": None,
                             "weight": 1, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                             "function_call": {"name": "g", "arguments": "{}"}}))
    assert sorted(n.notes) == ["legacy function_call beside tool_calls not kept",
                               "message field 'weight' not kept", "tool call arguments that are not valid JSON kept as given",
                               "tool_call_id on a assistant turn not kept"]
    assert n.messages[1]["tool_calls"][0]["function"]["arguments"] == "{bad"


def test_first_non_blank_reasoning_wins():
    n = normalize(chat_with({"role": "assistant", "content": "a", "reasoning_content": "", "reasoning": "real"}))
    assert n.messages[1]["reasoning_content"] == "real"


def test_legacy_functions_and_responses_api_schemas_are_tools():
    flat = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    wrapped = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = chat_with({"role": "assistant", "content": "a"})
    assert json.loads(normalize({**msgs, "tools": [flat]}).tools) == wrapped
    assert json.loads(normalize({**msgs, "functions": [{"name": "f", "parameters": {"type": "object"}}]}).tools) == wrapped


def test_sharegpt_system_must_be_text():
    with pytest.raises(BadRecord, match="field 'system' must be a string, got list"):
        normalize({"system": ["s"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
