"""Property tests (hypothesis) for the readers and format adapters: any input either becomes a valid
canonical record or a BadRecord with a reason (never a crash), conversions keep text exactly, ids do not
depend on the format or the container, and every accepted record fits the Arrow record schema."""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate import schema
from curate.formats.adapters import BadRecord, Normalized, canonical_json, iter_normalized, normalize, record_id
from curate.formats.records import ROLES
from curate.io.readers import RawError, parse_json_line, read_records

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text with the awkward parts of Unicode: surrogates (unpaired ones can come from "\ud800" JSON escapes),
# control characters, newlines, BOMs, astral characters.
text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
               | st.sampled_from(["\ud800", "\udfff", "\ud83d", "\x00", "\ufeff", "\n", " ", "#", "\u00e9"]),
               max_size=40)
visible = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip())
keys = st.sampled_from(["messages", "conversations", "prompt", "completion", "response", "answer", "question",
                        "instruction", "input", "output", "chosen", "traj", "problem", "solution", "role",
                        "content", "from", "value", "reward", "success", "ground_truth", "text", "id"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys | text, inner, max_size=4),
    max_leaves=12)
raw_records = st.dictionaries(keys, json_values, max_size=5)
message_dicts = st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from([*ROLES, "narrator"]), text)


def fits_record_schema(n: Normalized) -> None:
    row = {"id": record_id(n), "source": "x", "source_index": 0, "format": n.format, "messages": n.messages,
           "tools": n.tools, "ground_truth": n.ground_truth, "reward": n.reward}
    pa.Table.from_pylist([row], schema=schema.arrow_schema(schema.RECORD))


@SETTINGS
@given(raw=raw_records | st.builds(lambda m: {"messages": m}, st.lists(message_dicts, max_size=4)))
def test_any_record_is_normalized_or_refused_with_a_reason(raw):
    try:
        n = normalize(raw)
    except BadRecord as e:
        assert str(e)
        return
    roles = [m["role"] for m in n.messages]
    assert "assistant" in roles and set(roles) <= set(ROLES)
    # blank content only where a turn may be blank: system and tool turns, assistant turns that call tools
    assert all(isinstance(m["content"], str) and (m["content"].strip() or m["role"] in ("system", "tool") or
                                                  m.get("tool_calls") or m.get("reasoning_content"))
               for m in n.messages)
    assert n.reward is None or isinstance(n.reward, float)
    fits_record_schema(n)


@SETTINGS
@given(line=st.binary(max_size=80) | text.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_line_parses_or_is_a_raw_error(line):
    out = parse_json_line(line)
    assert out is None or isinstance(out, (dict, RawError))
    if isinstance(out, RawError):
        assert out.reason and isinstance(out.raw, str)


@SETTINGS
@given(items=st.lists(raw_records | st.builds(RawError, text, text), max_size=6))
def test_iter_normalized_yields_one_result_per_record_in_order(items):
    indexed = list(enumerate(items))
    results = list(iter_normalized("mem.jsonl", indexed))
    assert [i for i, _, _ in results] == list(range(len(items)))
    assert all(isinstance(r, (Normalized, BadRecord)) for _, _, r in results)


turns = st.lists(st.tuples(visible, visible), min_size=1, max_size=3)


@SETTINGS
@given(turns=turns, system=st.none() | visible, reward=st.none() | st.booleans())
def test_conversation_survives_every_container_and_format(tmp_path_factory, turns, system, reward):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": c} for u, a in turns for r, c in (("user", u), ("assistant", a))]
    as_messages = {"messages": msgs, **({"reward": reward} if reward is not None else {})}
    as_sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                      "value": m["content"]} for m in msgs],
                   **({"reward": reward} if reward is not None else {})}
    folder = tmp_path_factory.mktemp("containers")
    lines = (json.dumps(as_messages) + "\n" + json.dumps(as_sharegpt, ensure_ascii=False) + "\n").encode()
    files = {"a.jsonl": lines, "b.json": json.dumps([as_messages, as_sharegpt]).encode(),
             "c.jsonl.gz": gzip.compress(lines, mtime=0)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        results = [r for _, _, r in iter_normalized(name, read_records(folder / name))]
        assert [r.format for r in results] == ["messages", "sharegpt"]
        assert all(r.messages == msgs for r in results)  # text kept exactly, no stripping
        assert len({record_id(r) for r in results}) == 1  # same content, same id, whatever the format
        assert results[0].reward == (None if reward is None else float(reward))
        fits_record_schema(results[0])


@SETTINGS
@given(prompt=visible, completion=visible, key=st.sampled_from(["completion", "response"]))
def test_prompt_completion_is_user_then_assistant(prompt, completion, key):
    n = normalize({key: completion, "prompt": prompt})
    assert n.format == "prompt_completion"
    assert n.messages == [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


@SETTINGS
@given(raw=raw_records)
def test_record_id_ignores_key_order_and_the_source(raw):
    try:
        a = normalize(raw)
    except BadRecord:
        return
    b = normalize(dict(reversed(list(raw.items()))))
    assert record_id(a) == record_id(b) and len(record_id(a)) == 32
    assert set(record_id(a)) <= set(string.hexdigits.lower())


@SETTINGS
@given(messages=st.lists(message_dicts | st.dictionaries(st.sampled_from(["role", "content", "name"]), text),
                         max_size=4),
       truth=st.none() | text,
       reward=st.none() | st.floats() | st.integers(-2**70, 2**70) | st.booleans())
def test_fast_canonical_json_is_json_dumps(messages, truth, reward):
    n = Normalized("messages", messages, truth, reward)
    expected = json.dumps({"messages": messages, "ground_truth": truth, "reward": reward},
                          sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert canonical_json(n) == expected


def test_unpaired_surrogate_is_a_bad_record_not_a_crash(tmp_path):
    path = Path(tmp_path) / "s.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi \\ud800"}, '
                    '{"role": "assistant", "content": "ok"}]}\n')
    [(index, _, result)] = list(iter_normalized(path, read_records(path)))
    assert index == 0 and isinstance(result, BadRecord) and "surrogate" in str(result)
