"""Chat templates with tools and reasoning: real templates (shipped inside TRL), the embedded SmolLM2
tokenizer, no network. Independent checks: transformers' own assistant mask from `{% generation %}`
markers (TRL's *_training templates, and Qwen3's template with markers added here), decoded masks
compared with the turns as the template renders them."""

from __future__ import annotations

import json
import os

import pytest

from curate import chat
from curate.chat import TemplateError, encode, tool_support
from curate.messages import for_template

trl = pytest.importorskip("trl")
TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")


def template(name: str) -> str:
    path = os.path.join(TEMPLATES, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not shipped with this TRL")
    with open(path, encoding="utf-8") as f:
        return f.read()


def call(cid, name, **args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# Two user queries; reasoning on several turns; a turn that only calls a tool, one that talks and calls.
AGENT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
     "tool_calls": [call("c1", "get_weather", city="Paris")]},
    {"role": "tool", "content": "OBSERVATION-PARIS 18C", "tool_call_id": "c1", "name": "get_weather"},
    {"role": "assistant", "content": "It is 18C and sunny.", "reasoning_content": "The tool said 18C."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [call("c2", "get_weather", city="Rome")]},
    {"role": "tool", "content": "OBSERVATION-ROME 25C", "tool_call_id": "c2", "name": "get_weather"},
    {"role": "assistant", "content": "25C in Rome.", "reasoning_content": "Rome is 25C."},
]
OBSERVATIONS = ("OBSERVATION-PARIS", "OBSERVATION-ROME")


def arrow_row(messages):
    """The messages as an Arrow row reads back: every optional field present, null when absent."""
    keys = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")
    return [{k: m.get(k) for k in keys} for m in messages]


def masked_runs(tok, enc) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, run = [], []
    for t, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            run.append(t)
        elif run:
            runs.append(tok.decode(run))
            run = []
    if run:
        runs.append(tok.decode(run))
    return runs


def spans_text(tok, messages, **kw) -> list[str]:
    """The assistant spans as text (characters: the SmolLM2 vocabulary merges DeepSeek's markers,
    which are not special tokens in it, with their neighbours)."""
    text, spans = chat.assistant_spans(tok, messages, **kw)
    return [text[s:e] for s, e in spans]


def hf_mask(tok, messages, tools, text):
    """transformers' assistant mask for a template with {% generation %} markers."""
    out = tok.apply_chat_template(messages, tools=tools, chat_template=text, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def assert_same_but_trailing_whitespace(tok, enc, ids, mask):
    """Equal masks, except that the markers may also cover the newline after an end-of-turn token
    (we stop at the end-of-turn token)."""
    assert ids == enc.input_ids
    for t, (mine, theirs) in enumerate(zip(enc.loss_mask, mask)):
        if mine != theirs:
            assert (theirs, mine) == (1, 0) and tok.decode([ids[t]]).strip() == "", (t, tok.decode([ids[t]]))


def qwen3_with_markers() -> str:
    """qwen3.jinja with {% generation %} around each assistant turn after its header, the history
    rewriting kept: an oracle for the turns as that template renders them."""
    text = template("qwen3.jinja")
    think = ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
             "'\\n</think>\\n\\n' + content.lstrip('\\n') }}")
    plain = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    branch = "        {%- if loop.index0 > ns.last_query_index %}"
    end = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    if not (text.count(think) == 1 and text.count(plain) == 2 and text.count(branch) == 1 and text.count(end) == 1):
        pytest.skip("qwen3.jinja changed; the markers cannot be placed")
    text = text.replace(think, think.replace("'<|im_start|>' + message.role + '\\n<think>\\n'", "'<think>\\n'"))
    text = text.replace(plain, "{{- content }}")
    header = "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    text = text.replace(branch, header + "        {%- generation %}\n" + branch)
    return text.replace(end, "        {{- '<|im_end|>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}\n"
                             "    {%- elif message.role == \"tool\" %}")


# --------------------------------------------------------------------------------------- tool support

def support(calls, tools, tool_role, system_role=True, reasoning=False, string_arguments=False):
    return {"tool_calls": calls, "tools": tools, "tool_role": tool_role, "system_role": system_role,
            "reasoning": reasoning, "string_arguments": string_arguments}


@pytest.mark.parametrize("name, expected", [
    # writes a string `arguments` as it is; renders the last turn's reasoning
    ("qwen3.jinja", support(True, True, True, reasoning=True, string_arguments=True)),
    ("qwen3_instruct_2507.jinja", support(True, True, True, string_arguments=True)),
    ("llama3_1.jinja", support(True, True, True)),  # `arguments | tojson`: a string would be quoted
    # concatenates `arguments` as a string (a dict raises): the call renders with the input's text
    ("deepseekv3.jinja", support(True, False, True, string_arguments=True)),
    # R1 drops calls whenever content is set (ours is "" for a call-only turn)
    ("deepseek_r1_distill.jinja", support(False, False, True)),
    ("gemma.jinja", support(False, False, False, system_role=False)),  # refuses a tool turn, a system turn
    ("phi3.jinja", support(False, False, False)),   # ignores it
    ("qwen2_5.jinja", support(True, True, True)),
    ("gptoss.jinja", support(True, True, True, reasoning=True)),
])
def test_tool_support_per_template(smol_tokenizer, name, expected):
    assert tool_support(smol_tokenizer, template(name)) == expected


def test_tool_support_of_smollm2_chatml(smol_tokenizer):
    # ChatML writes any role, so tool results show; calls and schemas are ignored
    assert tool_support(smol_tokenizer) == support(False, False, True)


# ---------------------------------------------------------------------- Qwen3: history rewritten

def test_qwen3_mask_equals_the_templates_own_markers(smol_tokenizer):
    tok, text = smol_tokenizer, template("qwen3.jinja")
    enc = encode(tok, AGENT, tools=TOOLS, chat_template=text)
    ids, mask = hf_mask(tok, for_template(AGENT), TOOLS, qwen3_with_markers())
    assert ids == enc.input_ids and mask == enc.loss_mask
    assert enc.tool_rendering == "template"


def test_qwen3_turns_as_rendered_earlier_reasoning_dropped(smol_tokenizer):
    enc = encode(smol_tokenizer, AGENT, tools=TOOLS, chat_template=template("qwen3.jinja"))
    assert masked_runs(smol_tokenizer, enc) == [
        # before the last user query: reasoning dropped by the template
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18C and sunny.<|im_end|>",
        # after it, not last, no reasoning: no <think> block
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "<think>\nRome is 25C.\n</think>\n\n25C in Rome.<|im_end|>",
    ]


def test_qwen3_reasoning_kept_on_every_turn_after_the_last_query(smol_tokenizer):
    chat_ = [{"role": "user", "content": "Weather in Paris?"}, *AGENT[2:5]]  # one query: nothing dropped
    enc = encode(smol_tokenizer, chat_, chat_template=template("qwen3.jinja"))
    runs = masked_runs(smol_tokenizer, enc)
    assert runs[0].startswith("<think>\nI should call the tool.\n</think>\n\n<tool_call>")
    assert runs[1] == "<think>\nThe tool said 18C.\n</think>\n\nIt is 18C and sunny.<|im_end|>"


def test_qwen3_training_template_matches_transformers_mask(smol_tokenizer):
    tok, text = smol_tokenizer, template("qwen3_training.jinja")
    enc = encode(tok, AGENT, tools=TOOLS, chat_template=text)
    assert_same_but_trailing_whitespace(tok, enc, *hf_mask(tok, for_template(AGENT), TOOLS, text))
    assert "<think>\nI should call the tool.\n</think>" in masked_runs(tok, enc)[0]  # no rewriting here


def test_arrow_rows_encode_like_compact_messages(smol_tokenizer):
    text = template("qwen3.jinja")
    a = encode(smol_tokenizer, AGENT, tools=TOOLS, chat_template=text)
    b = encode(smol_tokenizer, arrow_row(AGENT), tools=TOOLS, chat_template=text)
    assert (a.input_ids, a.loss_mask) == (b.input_ids, b.loss_mask)


def test_observations_and_prompts_are_never_targets(smol_tokenizer):
    for name in ("qwen3.jinja", "qwen3_training.jinja", "llama3_1.jinja", None):
        messages = AGENT if name != "llama3_1.jinja" else AGENT[1:]
        enc = encode(smol_tokenizer, messages, tools=TOOLS, chat_template=template(name) if name else None)
        masked = "".join(masked_runs(smol_tokenizer, enc))
        assert not any(o in masked for o in OBSERVATIONS), name
        assert "Weather in Paris?" not in masked and "Be brief." not in masked and "<tools>" not in masked


# ------------------------------------------------------------------------------------------ DeepSeek-R1

def test_deepseek_r1_masks_answers_without_the_reasoning_it_drops(smol_tokenizer):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "<think>\nagain\n</think>\n\nIt is 6."}]
    assert spans_text(smol_tokenizer, messages, chat_template=template("deepseek_r1_distill.jinja")) == [
        "\n\nIt is 4.<｜end▁of▁sentence｜>", "\n\nIt is 6.<｜end▁of▁sentence｜>"]


def test_deepseek_r1_tool_calls_written_as_text(smol_tokenizer):
    text = template("deepseek_r1_distill.jinja")
    messages = [m if m["role"] != "assistant" else {k: v for k, v in m.items() if k != "reasoning_content"}
                for m in AGENT[1:5]]
    assert encode(smol_tokenizer, messages, tools=TOOLS, chat_template=text).tool_rendering == "text"
    assert spans_text(smol_tokenizer, messages, tools=TOOLS, chat_template=text) == [
        f"{chat.tool_call_text(AGENT[2]['tool_calls'][0])}<｜end▁of▁sentence｜>",
        "It is 18C and sunny.<｜end▁of▁sentence｜>"]  # after tool output R1 writes no header


def test_deepseek_r1_reasoning_written_as_text_is_dropped_where_r1_drops_it(smol_tokenizer):
    # R1 does not read reasoning_content: it goes into the content as a <think> block, which R1 itself
    # cuts off (it keeps what follows </think>) except after tool output
    assert spans_text(smol_tokenizer, AGENT[1:5], tools=TOOLS, chat_template=template("deepseek_r1_distill.jinja")) == [
        f"\n\n{chat.tool_call_text(AGENT[2]['tool_calls'][0])}<｜end▁of▁sentence｜>",
        "<think>\nThe tool said 18C.\n</think>\n\nIt is 18C and sunny.<｜end▁of▁sentence｜>"]


# ----------------------------------------------------------------------------------------------- Llama 3.1

def without_reasoning(messages):
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def test_llama31_mask_is_the_call_json_and_eot(smol_tokenizer):
    text, messages = template("llama3_1.jinja"), without_reasoning(AGENT[1:])
    assert encode(smol_tokenizer, messages, tools=TOOLS, chat_template=text).tool_rendering == "template"
    assert spans_text(smol_tokenizer, messages, tools=TOOLS, chat_template=text) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18C and sunny.<|eot_id|>",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>',
        "25C in Rome.<|eot_id|>",
    ]


def test_llama31_reasoning_is_written_as_text(smol_tokenizer):
    # Llama 3.1 ignores reasoning_content: it goes into the content (a call turn's content, and so its
    # reasoning, Llama does not write)
    text = template("llama3_1.jinja")
    assert encode(smol_tokenizer, AGENT[1:], tools=TOOLS, chat_template=text).tool_rendering == "text"
    assert spans_text(smol_tokenizer, AGENT[1:], tools=TOOLS, chat_template=text) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "<think>\nThe tool said 18C.\n</think>\n\nIt is 18C and sunny.<|eot_id|>",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>',
        "<think>\nRome is 25C.\n</think>\n\n25C in Rome.<|eot_id|>",
    ]


def test_llama31_refuses_parallel_calls_with_its_own_message(smol_tokenizer):
    two = {"role": "assistant", "content": "", "tool_calls": [call("a", "get_weather", city="Paris"),
                                                              call("b", "get_weather", city="Rome")]}
    with pytest.raises(TemplateError) as e:
        encode(smol_tokenizer, [AGENT[1], two], chat_template=template("llama3_1.jinja"))
    assert str(e.value) == "chat template: This model only supports single tool-calls at once!"


# ------------------------------------------------------------------------------- templates without tools

def test_smollm2_chatml_gets_calls_and_schemas_as_text(smol_tokenizer):
    tok = smol_tokenizer
    enc = encode(tok, AGENT, tools=TOOLS)
    assert enc.tool_rendering == "text"
    runs = masked_runs(tok, enc)
    paris, rome = (chat.tool_call_text(AGENT[i]["tool_calls"][0]) for i in (2, 6))
    assert paris == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    # ChatML ignores reasoning_content too: each turn's reasoning is a <think> block before its content
    assert runs == [f"<think>\nI should call the tool.\n</think>\n\n{paris}<|im_end|>",
                    "<think>\nThe tool said 18C.\n</think>\n\nIt is 18C and sunny.<|im_end|>",
                    f"Checking.\n{rome}<|im_end|>", "<think>\nRome is 25C.\n</think>\n\n25C in Rome.<|im_end|>"]
    text = tok.decode(enc.input_ids)
    system = f"Be brief.\n\n{chat.TOOLS_HEADER}\n<tools>\n{json.dumps(TOOLS[0])}\n</tools>"
    assert f"<|im_start|>system\n{system}<|im_end|>" in text
    assert "<|im_start|>tool\nOBSERVATION-PARIS 18C<|im_end|>" in text  # ChatML writes the tool role itself


def test_schemas_get_a_system_turn_when_there_is_none(smol_tokenizer):
    enc = encode(smol_tokenizer, AGENT[1:5], tools=TOOLS)
    assert smol_tokenizer.decode(enc.input_ids).startswith(f"<|im_start|>system\n{chat.TOOLS_HEADER}\n<tools>\n")


def test_results_become_a_user_turn_when_the_tool_role_is_ignored(smol_tokenizer):
    tok, text = smol_tokenizer, template("phi3.jinja")  # writes only system, user and assistant turns
    parallel = {"role": "assistant", "content": "", "tool_calls": [call("a", "get_weather", city="Paris"),
                                                                   call("b", "get_weather", city="Rome")]}
    messages = [AGENT[1], parallel, {"role": "tool", "content": "OBSERVATION-PARIS 18C", "tool_call_id": "a"},
                {"role": "tool", "content": "OBSERVATION-ROME 25C", "tool_call_id": "b"},
                {"role": "assistant", "content": "18C and 25C."}]
    enc = encode(tok, messages, chat_template=text)
    rendered = tok.decode(enc.input_ids)
    assert ("<|user|>\n<tool_response>\nOBSERVATION-PARIS 18C\n</tool_response>\n"
            "<tool_response>\nOBSERVATION-ROME 25C\n</tool_response><|end|>") in rendered
    runs = masked_runs(tok, enc)
    assert runs[0].count("<tool_call>") == 2 and runs[0].endswith("</tool_call><|end|>")
    assert not any("OBSERVATION" in r for r in runs)
    assert enc.tool_rendering == "text"


def test_no_tools_means_no_tool_rendering(smol_tokenizer):
    assert encode(smol_tokenizer, AGENT[1:2] + [{"role": "assistant", "content": "Hi."}]).tool_rendering is None


def test_a_turn_that_renders_nothing_of_its_own_is_refused(smol_tokenizer):
    # Qwen3 drops the reasoning of turns before the last user query: this turn is an empty reply there
    messages = [AGENT[1], {"role": "assistant", "content": "", "reasoning_content": "thinking only"},
                {"role": "user", "content": "Well?"}, {"role": "assistant", "content": "Sunny."}]
    with pytest.raises(TemplateError, match=r"^chat template: assistant turn 1 renders no tokens$"):
        encode(smol_tokenizer, messages, chat_template=template("qwen3.jinja"))
    # SmolLM2's template has no place for reasoning: it is written as text, so the turn is not empty
    enc = encode(smol_tokenizer, messages)
    assert masked_runs(smol_tokenizer, enc) == ["<think>\nthinking only\n</think>\n\n<|im_end|>", "Sunny.<|im_end|>"]
    assert enc.tool_rendering == "text"


# ----------------------------------------------------------------------------------- refusals, others

def test_gemma_refuses_a_system_turn(smol_tokenizer):
    with pytest.raises(TemplateError) as e:
        encode(smol_tokenizer, [*AGENT[:2], {"role": "assistant", "content": "Hi."}],
               chat_template=template("gemma.jinja"))
    assert str(e.value) == "chat template: System role not supported"
    assert isinstance(e.value, ValueError)


def test_gemma_refuses_two_user_turns_in_a_row(smol_tokenizer):
    messages = [AGENT[1], AGENT[5], {"role": "assistant", "content": "Hi."}]
    with pytest.raises(TemplateError, match=r"^chat template: Conversation roles must alternate"):
        encode(smol_tokenizer, messages, chat_template=template("gemma.jinja"))


def test_gemma4_turn_with_results_written_inside_it_is_refused(smol_tokenizer):
    # Gemma 4 writes the results of a call inside the calling turn, before the turn's own content
    with pytest.raises(TemplateError, match="assistant turn 1 is not one piece of the rendered text"):
        encode(smol_tokenizer, AGENT[5:9], chat_template=template("gemma4.jinja"))


def test_gpt_oss_history_replies_end_with_end_and_the_last_with_return(smol_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    assert spans_text(smol_tokenizer, messages, chat_template=template("gptoss.jinja")) == [
        "<|channel|>final<|message|>Hello.<|end|>", "<|channel|>final<|message|>Goodbye.<|return|>"]


# TRL's training variants carry {% generation %} markers: transformers' own spans are an independent
# answer. Ours end where theirs end (less trailing whitespace) and start where theirs start, or after
# template text that is part of the generation prompt (which these markers include).
MARKED = ["qwen3_training.jinja", "qwen2_5_training.jinja", "llama3_training.jinja", "glm4moe_training.jinja",
          "gemma3_training.jinja", "cohere2_training.jinja", "lfm2_training.jinja", "gptoss_training.jinja",
          "deepseek_r1_distill_training.jinja"]


@pytest.mark.parametrize("name", MARKED)
def test_spans_agree_with_generation_markers(smol_tokenizer, name):
    from transformers.utils.chat_template_utils import render_jinja_template

    tok, text = smol_tokenizer, template(name)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    tools_chat = [AGENT[1], {**AGENT[2], "reasoning_content": None}, AGENT[3], {**AGENT[4], "reasoning_content": None}]
    for messages, tools in ((plain, None), (tools_chat, TOOLS)):
        rendered, spans = chat.assistant_spans(tok, messages, tools=tools, chat_template=text)
        msgs, tools_, _, _ = chat.prepare(tok, messages, tools, text)
        (theirs_text,), (theirs,) = render_jinja_template([msgs], tools=tools_, chat_template=text,
                                                          return_assistant_tokens_mask=True, **tok.special_tokens_map)
        assert theirs_text == rendered
        theirs = [(a, b) for a, b in theirs if rendered[a:b].strip()]
        assert len(theirs) == len(spans)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for i, (a, b), (s, e) in zip(turns, theirs, spans):
            assert e == a + len(rendered[a:b].rstrip())
            prompt = tok.apply_chat_template(msgs[:i], tools=tools_, chat_template=text, tokenize=False,
                                             add_generation_prompt=True)
            assert a <= s and (s == a or prompt.find(rendered[a:s], a) >= 0), (rendered[a:s], rendered[s:e])


def test_turn_text_is_the_reasoning_then_the_content_then_the_calls(smol_tokenizer):
    paris = chat.tool_call_text(AGENT[2]["tool_calls"][0])
    assert chat.turn_text(AGENT[2]) == f"<think>\nI should call the tool.\n</think>\n\n{paris}"
    assert chat.turn_text(without_reasoning(AGENT)[2]) == paris
    assert chat.turn_text(AGENT[6]) == f"Checking.\n{chat.tool_call_text(AGENT[6]['tool_calls'][0])}"
    assert chat.turn_text(arrow_row(AGENT)[4]) == "<think>\nThe tool said 18C.\n</think>\n\nIt is 18C and sunny."
    assert chat.turn_text({**arrow_row(AGENT)[4], "reasoning_content": None}) == "It is 18C and sunny."
    assert chat.turn_text({**AGENT[4], "reasoning_content": "\nkept inside\n\n"}) == (
        "<think>\nkept inside\n</think>\n\nIt is 18C and sunny.")  # the reasoning's outer newlines go
    weird = call("c9", "f")
    weird["function"]["arguments"] = "not json"
    assert chat.tool_call_text(weird) == '<tool_call>\n{"name": "f", "arguments": not json}\n</tool_call>'


# ------------------------------------------------------------------- Mistral: 9-character call ids

# A Mistral-v0.3-like template: the system text in the first user turn (any other system turn refused),
# the schemas before the last user turn, calls as `[TOOL_CALLS] [JSON]` and results as `[TOOL_RESULTS]`,
# both refused unless the call id has 9 characters.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if tools and message == user_messages[-1] %}
            {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if message == user_messages[0] and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message.tool_calls is defined %}
        {{- '[TOOL_CALLS] [' }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.id is not defined or tool_call.id | length != 9 %}
                {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
            {%- endif %}
            {{- (tool_call.function | tojson)[:-1] + ', "id": "' + tool_call.id + '"}' }}
            {{- ', ' if not loop.last else ']' + eos_token }}
        {%- endfor %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- elif message['role'] == 'tool' %}
        {%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}
            {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + message['content'] | tojson + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}"""


def mistral_ids(messages):
    """AGENT with 9-character call ids, as Mistral's templates want them."""
    ids = {"c1": "abcDEF123", "c2": "xyz789QWE"}
    out = []
    for m in without_reasoning(messages):
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": ids[c["id"]]} for c in m["tool_calls"]]}
        if m.get("tool_call_id"):
            m = {**m, "tool_call_id": ids[m["tool_call_id"]]}
        out.append(m)
    return out


def test_mistral_like_template_renders_calls_natively(smol_tokenizer):
    tok = smol_tokenizer
    # what the old probe id would have met: the template refuses it
    with pytest.raises(TemplateError, match="length 9"):
        chat.render(tok, [AGENT[1], {**AGENT[6], "tool_calls": [call("call_0", "get_weather", city="Rome")]}],
                    chat_template=MISTRAL)
    assert tool_support(tok, MISTRAL) == support(True, True, True)
    messages = mistral_ids(AGENT)
    enc = encode(tok, messages, tools=TOOLS, chat_template=MISTRAL)
    assert enc.tool_rendering == "template"
    text = tok.decode(enc.input_ids)
    assert "<tool_call>" not in text and "[AVAILABLE_TOOLS] [" in text and "Be brief.\n\nWeather in Paris?" in text
    # the schemas stand before the last user turn: turns before it are found in the full text itself
    assert spans_text(tok, messages, tools=TOOLS, chat_template=MISTRAL) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]<|im_end|>',
        " It is 18C and sunny.<|im_end|>",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "xyz789QWE"}]<|im_end|>',
        " 25C in Rome.<|im_end|>"]
    masked = "".join(masked_runs(tok, enc))
    assert not any(o in masked for o in OBSERVATIONS) and "AVAILABLE_TOOLS" not in masked and "Paris?" not in masked


def test_mistral_like_template_refuses_a_later_system_turn(smol_tokenizer):
    messages = [AGENT[1], {"role": "system", "content": "Late."}, {"role": "assistant", "content": "Hi."}]
    with pytest.raises(TemplateError, match="^chat template: Only user and assistant roles"):
        encode(smol_tokenizer, messages, chat_template=MISTRAL)


# ------------------------------------------------------------- Gemma: schemas without a system role

def test_gemma_gets_the_schemas_in_the_first_user_turn(smol_tokenizer):
    tok, text = smol_tokenizer, template("gemma.jinja")
    assert tool_support(tok, text)["system_role"] is False
    messages = without_reasoning(AGENT[1:5])  # no system turn
    enc = encode(tok, messages, tools=TOOLS, chat_template=text)  # not refused
    assert enc.tool_rendering == "text"
    rendered = tok.decode(enc.input_ids)
    assert f"<start_of_turn>user\n{chat.tools_text(TOOLS)}\n\nWeather in Paris?<end_of_turn>" in rendered
    assert rendered.count(chat.TOOLS_HEADER) == 1
    assert masked_runs(tok, enc) == [f"{chat.tool_call_text(AGENT[2]['tool_calls'][0])}<end_of_turn>",
                                     "It is 18C and sunny.<end_of_turn>"]
    # a record with its own system turn is still refused with Gemma's words
    with pytest.raises(TemplateError, match="^chat template: System role not supported$"):
        encode(tok, without_reasoning(AGENT[:5]), tools=TOOLS, chat_template=text)


def test_schemas_stay_in_the_system_turn_where_there_is_one(smol_tokenizer):
    # Gemma 3 merges a system turn into the first user turn itself: it has a system role
    tok, text = smol_tokenizer, template("gemma3.jinja")
    assert tool_support(tok, text)["system_role"] is True
    rendered = chat.render(tok, without_reasoning(AGENT[:5]), tools=TOOLS, chat_template=text)
    assert f"Be brief.\n\n{chat.tools_text(TOOLS)}" in rendered


# ----------------------------------------------------------------- reasoning the template ignores

REASONED = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Answer.", "reasoning_content": "LONG THOUGHT"}]


@pytest.mark.parametrize("name", [None, "qwen2_5.jinja", "llama3_1.jinja", "gemma3.jinja", "deepseekv3.jinja",
                                  "phi3.jinja"])
def test_reasoning_a_template_ignores_is_written_as_text(smol_tokenizer, name):
    tok = smol_tokenizer
    text = template(name) if name else None
    assert tool_support(tok, text)["reasoning"] is False
    plain = encode(tok, [REASONED[0], {"role": "assistant", "content": "Answer."}], chat_template=text)
    enc = encode(tok, REASONED, chat_template=text)
    assert enc.input_ids != plain.input_ids and enc.tool_rendering == "text" and plain.tool_rendering is None
    rendered, spans = chat.assistant_spans(tok, REASONED, chat_template=text)
    (s, e), = spans
    if name == "deepseekv3.jinja":
        # the text form reaches DeepSeek-V3, which keeps only what follows `</think>` of a reply's
        # content (not after tool output: see the next test)
        assert rendered[s:e] == "\n\nAnswer.<｜end▁of▁sentence｜>"
    else:
        assert "<think>\nLONG THOUGHT\n</think>\n\nAnswer." in rendered[s:e]
        assert "LONG THOUGHT" in "".join(masked_runs(tok, enc))
    assert chat.turn_text(REASONED[1]) == "<think>\nLONG THOUGHT\n</think>\n\nAnswer."


def test_deepseek_v3_keeps_reasoning_written_as_text_after_tool_output(smol_tokenizer):
    text = template("deepseekv3.jinja")
    messages = [*COMPACT[:3], {**COMPACT[3], "reasoning_content": "LONG THOUGHT"}]
    assert spans_text(smol_tokenizer, messages, chat_template=text)[-1] == (
        "<think>\nLONG THOUGHT\n</think>\n\n18C.<｜end▁of▁sentence｜>")


def test_reasoning_a_template_renders_stays_native(smol_tokenizer):
    tok, text = smol_tokenizer, template("qwen3.jinja")
    enc = encode(tok, REASONED, chat_template=text)
    assert enc.tool_rendering == "template"
    assert masked_runs(tok, enc) == ["<think>\nLONG THOUGHT\n</think>\n\nAnswer.<|im_end|>"]
    assert enc.input_ids == tok.apply_chat_template(REASONED, chat_template=text, tokenize=True, return_dict=True)[
        "input_ids"]


# ------------------------------------------------------------------------ call arguments as given

COMPACT = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
           {"role": "tool", "content": "18C", "tool_call_id": "c1", "name": "get_weather"},
           {"role": "assistant", "content": "18C."}]


@pytest.mark.parametrize("name", ["qwen3.jinja", "qwen3_instruct_2507.jinja", "deepseekv3.jinja"])
def test_templates_that_write_argument_text_get_it_as_given(smol_tokenizer, name):
    tok, text = smol_tokenizer, template(name)
    assert tool_support(tok, text)["string_arguments"] is True
    enc = encode(tok, COMPACT, tools=TOOLS, chat_template=text)
    call_span = spans_text(tok, COMPACT, tools=TOOLS, chat_template=text)[0]
    assert '{"city":"Paris"}' in call_span and '{"city": "Paris"}' not in call_span
    if name == "deepseekv3.jinja":  # it raised on a dict (str + dict): the call was text form before
        assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather" in call_span
    # the tokens a trainer gets when it renders the messages with arguments as strings (TRL, OpenRLHF)
    msgs, tools, rendering, _ = chat.prepare(tok, COMPACT, TOOLS, text)
    assert rendering == enc.tool_rendering == ("text" if name == "deepseekv3.jinja" else "template")  # V3: no `tools`
    assert enc.input_ids == tok.apply_chat_template(msgs, tools=tools, chat_template=text, tokenize=True,
                                                    return_dict=True)["input_ids"]
    calls = [m for m in msgs if m.get("tool_calls")]
    assert calls[0]["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'
    assert calls[0] == COMPACT[1]


def test_llama31_gets_arguments_as_an_object(smol_tokenizer):
    tok, text = smol_tokenizer, template("llama3_1.jinja")
    assert tool_support(tok, text)["string_arguments"] is False
    spans = spans_text(tok, COMPACT, tools=TOOLS, chat_template=text)
    assert spans[0] == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'  # not a quoted string


# ------------------------------------------------------------------------------- check_template

def test_check_template_accepts_every_shipped_template_and_refuses_broken_ones():
    for name in sorted(os.listdir(TEMPLATES)):
        if name.endswith(".jinja"):
            chat.check_template(template(name), name)  # {% generation %} markers included
    with pytest.raises(ValueError) as e:
        chat.check_template("{{ bos_token }}\n{% for m in messages %}\n{{ m.content }}\n{% endif %}", "t.jinja")
    assert str(e.value).startswith("--chat-template t.jinja: not a valid Jinja template (line 4: Encountered unknown tag")
    assert isinstance(e.value, ValueError) and not isinstance(e.value, TemplateError)
    with pytest.raises(ValueError, match=r"^--chat-template t\.jinja: not a valid Jinja template \(line 2: .*'endfor'"):
        chat.check_template("{% if x %}\n{% endfor %}", "t.jinja")
    with pytest.raises(ValueError, match=r"\(line 1: No filter named 'nosuch'"):
        chat.check_template("{{ x | nosuch }}", "t.jinja")
