"""Adapter rules on small synthetic records: detection, each format's mapping, bad-record reasons, ids."""

from __future__ import annotations

import math

import pytest

from curate.formats.adapters import FORMATS, BadRecord, Normalized, detect_format, iter_normalized, normalize, record_id
from curate.io.readers import RawError

U, A = "user", "assistant"


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


SAMPLES = {
    "messages": {"messages": msgs((U, "hi"), (A, "hello"))},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "prompt_completion": {"prompt": "hi", "completion": "hello"},
    "question_answer": {"question": "1+1?", "answer": "2\n#### 2"},
    "alpaca": {"instruction": "hi", "input": "", "output": "hello"},
    "hh": {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    "transcript": {"traj": "Your task is to: look.\n> look\nYou see a desk."},
    "actions": {"problem": "buy socks", "action_history": ["search[socks]", "click[Buy Now]"], "score": 0.5},
    "webshop_session": {"page": "done", "url": "http://h/done/s1/B01/%7B%7D", "goal": {"instruction_text": "buy"},
                        "content": {"asin": "B01"}, "reward": 1.0},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_detects_and_normalises_each_format(fmt):
    assert detect_format(SAMPLES[fmt]) == fmt
    n = normalize(SAMPLES[fmt])
    assert n.format == fmt and any(m["role"] == A for m in n.messages)
    assert normalize(SAMPLES[fmt], fmt) == n


def test_same_content_same_id_across_formats():
    ids = {record_id(normalize(SAMPLES[f])) for f in ("messages", "sharegpt", "prompt_completion", "alpaca", "hh")}
    assert len(ids) == 1
    (only,) = ids
    assert len(only) == 32 and int(only, 16) >= 0


def test_id_covers_reward_and_ground_truth_but_not_extra_fields():
    base = record_id(normalize(SAMPLES["messages"]))
    assert record_id(normalize({**SAMPLES["messages"], "reward": 1})) != base
    assert record_id(normalize({**SAMPLES["messages"], "ground_truth": "x"})) != base
    assert record_id(normalize({**SAMPLES["messages"], "source": "elsewhere"})) == base
    as_int, as_float = ({**SAMPLES["messages"], "reward": r} for r in (1, 1.0))
    assert record_id(normalize(as_int)) == record_id(normalize(as_float))


BAD = [
    ([1, 2], "auto", "record is not an object, got list"),
    ({"foo": 1, "bar": 2}, "auto", "unrecognised record: keys ['bar', 'foo']"),
    ({"messages": "hi"}, "auto", "field 'messages' must be a list, got str"),
    ({"messages": ["hi"]}, "auto", "message 0: must be an object, got str"),
    ({"messages": msgs((U, "a"), (A, "b"), ("bot", "c"))}, "auto", "message 2: unknown role 'bot'"),
    ({"messages": [{"content": "a"}]}, "auto", "message 0: no 'role'"),
    ({"messages": msgs(("human", "a"), (A, "b"))}, "auto", "message 0: unknown role 'human'"),
    ({"messages": msgs((U, ""), (A, "b"))}, "auto", "message 0: content is empty"),
    ({"messages": msgs((U, "a"), (A, " \n\t"))}, "auto", "message 1: content is empty"),
    ({"messages": [{"role": U, "content": 3}, {"role": A, "content": "b"}]}, "auto",
     "message 0: content must be a string, got int"),
    ({"messages": [{"role": U}, {"role": A, "content": "b"}]}, "auto", "message 0: no content"),
    ({"messages": msgs((U, "a"), (U, "b"))}, "auto", "no assistant turn"),
    ({"messages": msgs(("system", "be nice"))}, "auto", "only system turns"),
    ({"messages": []}, "auto", "no messages"),
    ({"messages": [{"role": U, "content": [{"type": "image_url"}]}]}, "auto",
     "message 0: content part 0 is 'image_url', only text parts are supported"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "auto",
     "message 1: unknown role 'bot'"),
    ({**SAMPLES["messages"], "result": "yes"}, "auto", "field 'result' must be a number or boolean, got str"),
    ({**SAMPLES["messages"], "reward": math.inf}, "auto", "field 'reward' must be finite, got inf"),  # NaN: missing
    ({"prompt": 5, "completion": "x"}, "auto", "field 'prompt' must be a string or a list of messages, got int"),
    ({"question": "q", "answer": None}, "auto", "field 'answer' must be a string, got null"),
    ({"instruction": "do", "instances": []}, "auto", "field 'instances' must hold at least one {input, output} object"),
    ({"chosen": "just text"}, "auto", "field 'chosen' must be a dialogue of '\\n\\nHuman:' / '\\n\\nAssistant:' turns"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: "}, "auto", "message 1: content is empty"),
    ({"traj": "You see a room.\nNothing happens."}, "auto", "transcript has no agent ('> ') line"),
    ({"traj": "> look\nYou see a desk."}, "auto", "transcript has no task text before the first agent line"),
    ({"problem": "p", "action_history": []}, "auto", "field 'action_history' is empty"),
    ({"problem": "p", "action_history": ["a", 1]}, "auto", "field 'action_history' item 1 must be a string, got int"),
    ({**SAMPLES["webshop_session"], "page": "index"}, "auto",
     "webshop session has no 'done' page (session not finished)"),
    (SAMPLES["prompt_completion"], "alpaca", "record does not fit format 'alpaca': keys ['completion', 'prompt']"),
    ("text", "hh", "record does not fit format 'hh': got str"),
]


@pytest.mark.parametrize(("raw", "fmt", "reason"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_records_say_why(raw, fmt, reason):
    with pytest.raises(BadRecord) as e:
        normalize(raw, fmt)
    assert str(e.value) == reason


def test_unknown_forced_format_is_a_usage_error_not_a_bad_record():
    with pytest.raises(ValueError, match="unknown format 'csv'") as e:
        normalize(SAMPLES["messages"], "csv")
    assert not isinstance(e.value, BadRecord)


@pytest.mark.parametrize(("fields", "reward"), [
    ({"success": True}, 1.0), ({"success": False}, 0.0), ({"result": 0}, 0.0), ({"result": 1}, 1.0),
    ({"score": 0.25}, 0.25), ({"reward": 2, "score": 0.5}, 2.0), ({"reward": None, "score": 0.5}, 0.5), ({}, None),
])
def test_recorded_outcome(fields, reward):
    n = normalize({**SAMPLES["messages"], **fields})
    assert n.reward == reward and (reward is None or isinstance(n.reward, float))


@pytest.mark.parametrize(("raw", "truth"), [
    ({**SAMPLES["messages"], "ground_truth": 42}, "42"),
    ({**SAMPLES["question_answer"], "ground_truth": "7"}, "7"),  # an explicit field wins
    ({**SAMPLES["messages"], "answer": "x = 3"}, "x = 3"),  # a short answer that is not the reply
    ({**SAMPLES["messages"], "answer": "hello"}, "hello"),  # a short answer, even when it is the reply
    ({**SAMPLES["messages"], "answer": "y" * 101}, None),  # too long to be a final answer
    ({"question": "q", "answer": "so 1,000 apples\n#### 1,000 "}, "1,000"),
    ({"question": "q", "answer": "a worked solution, no marker " * 4}, None),
    ({"problem": "p", "solution": "thus \\boxed{\\frac{1}{2}}."}, "\\frac{1}{2}"),
    ({"problem": "p", "solution": "\\boxed{1} or \\boxed{x^{2}}", "answer": "x^2"}, "x^2"),
    ({"prompt": "q", "completion": "2 + 2 = 4\n#### 4\n"}, "4"),
    ({"prompt": "q", "completion": "#### Step 1\nadd them"}, None),  # a Markdown heading, not an answer
    ({"prompt": "q", "answer": "#### 5"}, "5"),
])
def test_ground_truth_rules(raw, truth):
    assert normalize(raw).ground_truth == truth


def test_content_parts_and_conversational_prompt_completion():
    parts = {"messages": [{"role": U, "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": A, "content": "c"}]}
    assert normalize(parts).messages[0]["content"] == "a\nb"
    trl = {"prompt": msgs(("system", "s"), (U, "q")), "completion": msgs((A, "r"))}
    assert normalize(trl).messages == msgs(("system", "s"), (U, "q"), (A, "r"))
    assert normalize({"prompt": "q", "response": "r", "target": "t"}).messages == msgs((U, "q"), (A, "r"))


def test_trl_preference_pairs_use_chosen():
    explicit = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    implicit = {"chosen": msgs((U, "hi"), (A, "hello")), "rejected": msgs((U, "hi"), (A, "go away"))}
    for raw in (explicit, implicit):
        n = normalize(raw)
        assert n.format == "hh" and record_id(n) == record_id(normalize(SAMPLES["messages"]))


def test_sharegpt_roles_and_system():
    call = '{"name": "f", "arguments": {"x": 1}}'
    raw = {"system": "sys", "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": call},
        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "done"}]}
    expected = msgs(("system", "sys"), (U, "q"), (A, ""), ("tool", "42"), (A, "done"))
    expected[2]["tool_calls"] = [{"id": None, "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    assert normalize(raw).messages == expected
    # a function_call turn that is not the JSON of a call is refused, not kept as assistant text
    raw["conversations"][1]["value"] = "f()"
    with pytest.raises(BadRecord, match="message 1: function_call value is not JSON"):
        normalize(raw)


def test_alpaca_input_system_and_history():
    raw = {"instruction": "Sum", "input": "1 2", "output": "3", "system": "math", "history": [["hi", "hello"]]}
    assert normalize(raw).messages == msgs(("system", "math"), (U, "hi"), (A, "hello"), (U, "Sum\n\n1 2"), (A, "3"))
    assert normalize({"instruction": "Sum", "input": "  ", "output": "3"}).messages[0]["content"] == "Sum"


def test_transcript_merges_runs_and_prepends_problem():
    trace = " think: plan\nOK.\n> go to a\n> open a\nIt opens.\n\nLook.\n>\n\n go to b\nArrived.\n>\n"
    raw = {"problem": "Task: tidy.", "trace": trace}
    assert normalize(raw).messages == msgs(
        (U, "Task: tidy."), (A, "think: plan"), (U, "OK."), (A, "go to a\nopen a"), (U, "It opens.\nLook."),
        (A, "go to b"), (U, "Arrived."))
    text = {"transcript": "Room.\nYour task: x.\n> act\nDone.", "success": True}
    n = normalize(text)
    assert n.messages == msgs((U, "Room.\nYour task: x."), (A, "act"), (U, "Done.")) and n.reward == 1.0


def _visit(kind: str, session: str, **content) -> dict:
    url = f"http://h/{session}" if kind == "index" else f"http://h/{kind}/{session}/x"
    visit = {"page": kind, "url": url, "goal": {"instruction_text": f"goal {session}"}, "content": content or None}
    return {**visit, "reward": 0.5} if kind == "done" else visit


def test_iter_normalized_groups_webshop_sessions_and_reports_raw_errors():
    items = [
        (0, _visit("index", "s1")),
        (1, _visit("search_results", "s1", keywords=["red", "shoe"], search_result_asins=["B1", "B2"], page=1)),
        (2, _visit("search_results", "s1", keywords=["red", "shoe"], search_result_asins=["B3"], page=2)),
        (3, _visit("item_page", "s1", asin="B3", options={})),
        (4, _visit("done", "s1", asin="B3")),
        (5, RawError("malformed JSON: Expecting value (col 1)", "{oops")),
        (7, _visit("index", "s2")),
        (8, SAMPLES["messages"]),
    ]
    out = list(iter_normalized("f.jsonl", items))
    assert [i for i, _, _ in out] == [0, 5, 7, 8]
    session = out[0][2]
    assert isinstance(session, Normalized) and session.reward == 0.5
    assert [m["content"] for m in session.messages if m["role"] == A] == [
        "search[red shoe]", "click[Next >]", "click[B3]", "click[Buy Now]"]
    assert session.messages[2] == {"role": U, "content": "search results (page 1): B1, B2"}
    assert out[0][1] == {"session_id": "s1", "pages": [v for _, v in items[:5]]}
    assert out[1][1] == "{oops" and str(out[1][2]) == "malformed JSON: Expecting value (col 1)"
    assert str(out[2][2]) == "webshop session has no 'done' page (session not finished)"
    assert isinstance(out[3][2], Normalized) and out[3][2].format == "messages"


def test_iter_normalized_forced_format():
    items = [(0, SAMPLES["messages"]), (1, SAMPLES["prompt_completion"])]
    out = list(iter_normalized("f.jsonl", items, "prompt_completion"))
    assert isinstance(out[0][2], BadRecord) and isinstance(out[1][2], Normalized)
    # a page visit under a forced non-session format is just a record that does not fit
    (_, _, result), = iter_normalized("f.jsonl", [(0, _visit("index", "s"))], "messages")
    assert str(result).startswith("record does not fit format 'messages'")


def test_webshop_sub_pages_and_going_back():
    def visit(kind, path, **content):
        return {"page": kind, "url": f"http://h/{path}", "goal": {"instruction_text": "buy a mug"}, "content": content}

    results = "search_results/s/%5B%27mug%27%5D/1"
    pages = [
        visit("search_results", results, keywords=["mug"], search_result_asins=["B7"], page=1),
        visit("item_page", "item_page/s/B7/kw/1/%7B%7D", asin="B7", options={}, page="1"),
        visit("item_sub_page", "item_sub_page/s/B7/kw/Features/1/%7B%7D", asin="B7", options={}),
        visit("item_page", "item_page/s/B7/kw/1/%7B%7D", asin="B7", options={}),
        visit("search_results", results, keywords=["mug"], search_result_asins=["B7"], page="x"),
        {**visit("done", "done/s/B7/%7B%7D", asin="B7"), "reward": True},
    ]
    n = normalize({"session_id": "s", "pages": pages})
    assert [m["content"] for m in n.messages if m["role"] == A] == [
        "search[mug]", "click[B7]", "click[Features]", "click[< Prev]", "click[< Prev]", "click[Buy Now]"]
    assert {"role": U, "content": "item B7 (Features)"} in n.messages
    assert n.reward == 1.0
