"""Prefix-RFT annotations: demo text, its token length, and cut points at clean boundaries."""

import json

import pytest

from curate import chat
from curate.stages.prefix import annotate
from tests.test_pipeline import load, prism, raw_dir  # noqa: F401 (raw_dir is a fixture)

REPLY = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips in total. So the answer is 72!\n#### 72"


def tokens(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def test_single_reply_demo_is_its_content(smol_tokenizer):
    messages = [{"role": "user", "content": "How many clips?"}, {"role": "assistant", "content": REPLY}]
    demo = annotate(smol_tokenizer, messages)
    ids, _ = tokens(smol_tokenizer, REPLY)
    assert demo.text == REPLY and demo.n_tokens == len(ids)


def clean_end(head: str, following: str) -> bool:
    """Independent of the stage's regexes: the text so far ends a line, or ends a sentence and is
    followed by whitespace (or nothing)."""
    if head.rstrip(" \t").endswith("\n"):
        return True
    core = head.rstrip().rstrip("\"')]")
    return core.endswith((".", "!", "?")) and (head != head.rstrip() or following.isspace() or not following)


def test_cut_points_are_exactly_the_clean_boundaries(smol_tokenizer):
    demo = annotate(smol_tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": REPLY}])
    ids, offsets = tokens(smol_tokenizer, REPLY)
    expected = [L for L in range(1, len(ids))
                if clean_end(REPLY[:offsets[L - 1][1]], REPLY[offsets[L - 1][1]:offsets[L - 1][1] + 1])]
    assert demo.cut_points == expected
    heads = {REPLY[:offsets[L - 1][1]].rstrip() for L in demo.cut_points}
    assert {"Natalia sold 48/2 = 24 clips in May.", REPLY[:REPLY.index("So the answer")].rstrip(),
            REPLY[:REPLY.index("72!") + 3]} <= heads
    assert not any(h.endswith(("48/2", "48+24 =")) for h in heads)
    for L in demo.cut_points:  # decoding the prefix and the rest gives back the text
        assert smol_tokenizer.decode(ids[:L]) + smol_tokenizer.decode(ids[L:]) == REPLY


def test_agent_transcript_cuts_at_turn_boundaries(smol_tokenizer):
    messages = [{"role": "system", "content": "You are in a house."}, {"role": "user", "content": "Task: find a mug"},
                {"role": "assistant", "content": "go to shelf 1"}, {"role": "user", "content": "You see a mug"},
                {"role": "assistant", "content": "take mug from shelf 1"}, {"role": "user", "content": "Done"}]
    demo = annotate(smol_tokenizer, messages)
    rendered = chat.render(smol_tokenizer, messages)
    assert demo.text.startswith("go to shelf 1") and demo.text.endswith("take mug from shelf 1")
    assert demo.text in rendered and "You see a mug" in demo.text and "Done" not in demo.text
    ids, offsets = tokens(smol_tokenizer, demo.text)
    second = demo.text.index("take mug")
    turn_cut = next(L for L in range(1, len(ids)) if offsets[L][0] == second)
    assert turn_cut in demo.cut_points
    assert smol_tokenizer.decode(ids[turn_cut:]) == "take mug from shelf 1"


def test_the_last_turn_is_whole_with_its_tool_calls_and_reasoning(smol_tokenizer):
    """The demonstration ends where the last turn's closing token begins, whatever that turn writes: a tool
    call after its text, or reasoning that happens to contain the text of its answer."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "transfer_to_human_agents", "arguments": json.dumps({"summary": "refund"})}}
    messages = [{"role": "user", "content": "I want a refund."},
                {"role": "assistant", "content": "Please hold on.", "tool_calls": [call]}]
    rendered = chat.render(smol_tokenizer, messages)
    demo = annotate(smol_tokenizer, messages)
    assert demo.text.startswith("Please hold on.") and demo.text.endswith("</tool_call>")
    assert "transfer_to_human_agents" in demo.text and demo.text in rendered
    assert rendered[rendered.index(demo.text) + len(demo.text):].startswith("<|im_end|>")

    thinking = [{"role": "user", "content": "Is 7 prime?"},
                {"role": "assistant", "content": "Yes.",
                 "reasoning_content": "7 has no divisors but 1 and 7, so the answer is Yes. Double-check: 7/2, 7/3."}]
    demo = annotate(smol_tokenizer, thinking)
    assert demo.text.startswith("<think>") and "Double-check: 7/2, 7/3." in demo.text
    assert demo.text.endswith("</think>\n\nYes.")


# A Phi-3-style template: every turn closes with <|end|> and a newline, the conversation with the end of text
PHI3_STYLE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# a base model's template given with --chat-template: its closing marker is plain text
PLAIN = ("{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n### end\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.mark.parametrize("template", [PHI3_STYLE, PLAIN], ids=["phi3-style", "plain-text"])
def test_the_closing_is_what_the_template_writes_after_a_reply(smol_tokenizer, template):
    """Whatever closes the last reply (several tokens, or plain text) is left out, and nothing of the reply:
    its own trailing whitespace (a code block's last newline) stays."""
    reply = "```py\nx = 1\n```\n"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    assert annotate(smol_tokenizer, messages, chat_template=template).text == reply
    two = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A."}, {"role": "user", "content": "more"},
           {"role": "assistant", "content": "B."}]
    demo = annotate(smol_tokenizer, two, chat_template=template).text
    assert demo.startswith("A.") and demo.endswith("B.") and "more" in demo


def test_no_assistant_text_gives_no_annotation(smol_tokenizer):
    assert annotate(smol_tokenizer, [{"role": "user", "content": "hi"}]) is None


@pytest.mark.parametrize("mode", ["rl", "all", "none"])
def test_prism_annotates_the_rows_asked_for(raw_dir, tmp_path, tiny_model_dir, smol_tokenizer, mode):
    out = tmp_path / "routed"
    assert prism(raw_dir, out, tiny_model_dir, "--prefix", mode) == 0
    for part in ("sft", "rl"):
        rows = load(out, part).to_pylist()
        annotated = mode == "all" or (mode == "rl" and part == "rl")
        for row in rows:
            if not annotated:
                assert row["demo"] is None and row["demo_len_tokens"] is None and row["cut_points"] is None
                continue
            demo = annotate(smol_tokenizer, row["messages"])
            assert (row["demo"], row["demo_len_tokens"], row["cut_points"]) == (demo.text, demo.n_tokens,
                                                                                 demo.cut_points)
    assert (out / ".work" / "prefix").exists() == (mode != "none")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["prefix"] == mode
