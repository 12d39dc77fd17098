"""What a template renders of tools and reasoning (`tool_support`), and the text form curate writes for
what it ignores (`prepare`), the Hermes/Qwen convention (SmolLM2's ChatML and most base-model templates
know nothing of tools; most templates other than reasoning models' know nothing of reasoning):

* reasoning (`reasoning_content`) goes into its turn's content as `<think>\n{reasoning}\n</think>\n\n{content}`
  (the Qwen/DeepSeek convention; the reasoning without its leading and trailing newlines);
* each call is appended to its turn's content as `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`
  (one block per call, blocks separated by a newline, ARGS the arguments' JSON object);
* tool schemas go into the system turn (one is prepended when there is none): TOOLS_HEADER, then
  `<tools>`, one JSON schema per line, `</tools>`. A template that refuses or drops a system turn
  (Gemma's "System role not supported") gets that text at the top of the first user turn instead,
  followed by a blank line and the user's text (a user turn holding it is prepended when there is none);
* tool results, when the template ignores the `tool` role, become one user turn per run of results,
  each result as `<tool_response>\n...\n</tool_response>`.

Call arguments reach a template as trainers that render exported messages give them (TRL, OpenRLHF:
the JSON text as the input had it) when the template writes a string `arguments` as it is (Qwen3,
DeepSeek-V3, GPT-OSS); else parsed into a dict (transformers' tool-use form, for templates that
serialise them themselves, e.g. Llama-3.1's `| tojson`)."""

from __future__ import annotations

import hashlib
import json

from curate.chat.templates import TemplateError, render_template, template_text
from curate.messages import call_arguments, compact_all, for_template

# Written into the system turn before the schemas when the template ignores `tools` (see module doc).
TOOLS_HEADER = ("You may call one or more functions to assist with the user query. The function signatures "
                "are within <tools></tools> XML tags. To call a function, reply with a JSON object holding its "
                "name and arguments within <tool_call></tool_call> XML tags.")

# The fixed conversation `tool_support` renders. Call ids: 9 alphanumerics first (Mistral's templates
# raise on any other id), then another form, tried when a template refuses the first.
_PROBE_IDS = ("call00001", "call_0")
_PROBE_RESULT = "curate-probe-result-5f1c"
_PROBE_SYSTEM = "curate-probe-system-9d3e"
_PROBE_THOUGHT = "curate-probe-thought-2b7a"
_PROBE_ARGUMENTS = '{"city":"Paris"}'  # compact: a template that re-serialises it adds spaces or escapes it
_PROBE_USER = {"role": "user", "content": "What is the weather in Paris?"}
_PROBE_REPLY = {"role": "assistant", "content": "It is sunny."}
_PROBE_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

_SUPPORT: dict[str, dict] = {}  # tool_support per template sha256


def tool_support(tokenizer, chat_template: str | None = None) -> dict[str, bool]:
    """What the template renders: {"tool_calls", "tools", "tool_role", "system_role", "reasoning",
    "string_arguments"}, each a bool.

    Found by rendering a fixed conversation with and without each feature (equal text, or an error,
    means ignored): `tool_calls`, an assistant turn's calls; `tools`, the schemas passed as
    `apply_chat_template(tools=...)`; `tool_role`, the text of a `tool` turn; `system_role`, the text
    of a system turn (Gemma refuses one); `reasoning`, the `reasoning_content` of the last assistant
    turn (a reply, or one that calls a tool: Gemma 4 writes it only there); `string_arguments`, a call
    whose `arguments` is JSON text, written exactly as given (not re-serialised, quoted or escaped),
    or refused as a dict and rendered as text: `prepare` then passes arguments as the input's text.
    A probe the template refuses is tried again with another call id (Mistral's templates want 9
    alphanumerics) and, for calls, with arguments as text. Cached per template text."""
    return dict(_support(tokenizer, template_text(tokenizer, chat_template)))


def _support(tokenizer, template: str) -> dict[str, bool]:
    key = hashlib.sha256(template.encode("utf-8")).hexdigest()
    if key not in _SUPPORT:
        _SUPPORT[key] = _detect_support(tokenizer, template)
    return _SUPPORT[key]


def _probe_call(call_id: str, arguments: str = '{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def _detect_support(tokenizer, template: str) -> dict[str, bool]:
    def text(messages, tools=None, keep_arguments=False):
        try:
            return render_template(tokenizer, template, for_template(messages, parse_arguments=not keep_arguments), tools)
        except TemplateError:
            return None

    def first(make):
        """The first rendering the template accepts over the probe call ids (None: it refuses all)."""
        for call_id in _PROBE_IDS:
            out = make(call_id)
            if out is not None:
                return out, call_id
        return None, _PROBE_IDS[0]

    def calling(call_id, arguments='{"city": "Paris"}'):
        return {"role": "assistant", "content": "", "tool_calls": [_probe_call(call_id, arguments)]}

    # arguments as text: written verbatim, not `"{\"city\"...` (tojson of a string) nor re-spaced
    shown, _ = first(lambda i: text([_PROBE_USER, calling(i, _PROBE_ARGUMENTS)], keep_arguments=True))
    at = shown.find(_PROBE_ARGUMENTS) if shown is not None else -1
    string_arguments = at >= 0 and shown[at - 1:at] not in ('"', "\\")

    without = text([_PROBE_USER, {"role": "assistant", "content": ""}])
    with_calls, call_id = first(lambda i: text([_PROBE_USER, calling(i)], keep_arguments=string_arguments))
    if with_calls is None and not string_arguments:  # refuses a dict: takes arguments only as text
        with_calls, call_id = first(lambda i: text([_PROBE_USER, calling(i)], keep_arguments=True))
        string_arguments = with_calls is not None
    calls = with_calls is not None and (with_calls != without if without is not None else
                                        "get_weather" in with_calls)

    plain = text([_PROBE_USER, _PROBE_REPLY])
    with_tools = text([_PROBE_USER, _PROBE_REPLY], [_PROBE_TOOL])
    tools = with_tools is not None and with_tools != plain

    def with_result(i):
        turn = calling(i) if calls else {"role": "assistant", "content": tool_call_text(_probe_call(i))}
        result = {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": i, "name": "get_weather"}
        return text([_PROBE_USER, turn, result, _PROBE_REPLY], keep_arguments=string_arguments)

    result_text, _ = first(with_result)
    system = text([{"role": "system", "content": _PROBE_SYSTEM}, _PROBE_USER, _PROBE_REPLY])
    # reasoning on the last turn: a reply, or a call (Gemma 4 writes it only before calls)
    thought = text([_PROBE_USER, {**_PROBE_REPLY, "reasoning_content": _PROBE_THOUGHT}])
    reasoning = thought is not None and thought != plain and _PROBE_THOUGHT in thought
    if not reasoning and calls:
        thought = text([_PROBE_USER, {**calling(call_id), "reasoning_content": _PROBE_THOUGHT}],
                       keep_arguments=string_arguments)
        reasoning = thought is not None and thought != with_calls and _PROBE_THOUGHT in thought
    return {"tool_calls": calls, "tools": tools,
            "tool_role": result_text is not None and _PROBE_RESULT in result_text,
            "system_role": system is not None and _PROBE_SYSTEM in system,
            "reasoning": reasoning,
            "string_arguments": calls and string_arguments}


def tool_call_text(call: dict) -> str:
    """One call in the text form: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, ARGS the
    arguments' JSON object (key order kept; arguments that are not a JSON object are written as given)."""
    fn = call["function"]
    args = call_arguments(fn.get("arguments"))
    args = json.dumps(args, ensure_ascii=False) if isinstance(args, dict) or not isinstance(args, str) else args
    return f'<tool_call>\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'


def tools_text(tools: list[dict]) -> str:
    """The schemas in the text form: TOOLS_HEADER, `<tools>`, one compact JSON schema per line, `</tools>`."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return f"{TOOLS_HEADER}\n<tools>\n{lines}\n</tools>"


def prepare(tokenizer, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None
            ) -> tuple[list[dict], list[dict] | None, str | None, list[int | None]]:
    """What goes to the template: (messages in template form, tools to pass, tool_rendering, origin).

    Messages are compacted (null fields dropped); call arguments stay the input's JSON text when the
    template writes it as is (`string_arguments`), else are parsed (`messages.for_template`); what the
    template ignores of tools and reasoning is written as text (module doc). tool_rendering is None when
    the record has no tools, calls, tool turns or reasoning, "text" when any of them was written as
    text, else "template". origin[j] is the index in `messages` of prepared message j (None for a turn
    added to hold the schemas; a run of tool results merged into one user turn has its first index)."""
    return prepare_for(tokenizer, template_text(tokenizer, chat_template, tools), messages, tools)


def prepare_for(tokenizer, template: str, messages: list[dict], tools: list[dict] | None):
    """`prepare` with the template text already chosen (`template_text`): the same four values."""
    msgs = compact_all(messages)
    origin: list[int | None] = list(range(len(msgs)))
    has_calls = any(m.get("tool_calls") for m in msgs)
    has_results = any(m["role"] == "tool" for m in msgs)
    has_reasoning = any(m["role"] == "assistant" and _reasoning(m) for m in msgs)
    if not (tools or has_calls or has_results or has_reasoning):
        return for_template(msgs), None, None, origin
    support = _support(tokenizer, template)
    as_text = False
    calls = has_calls and not support["tool_calls"]
    think = has_reasoning and not support["reasoning"]
    if calls or think:
        as_text = True
        msgs = [_as_text(m, calls, think) for m in msgs]
    if tools and not support["tools"]:
        as_text = True
        msgs, origin = _schemas_as_text(msgs, origin, tools, support["system_role"])
        tools = None
    if has_results and not support["tool_role"]:
        as_text = True
        msgs, origin = _results_as_text(msgs, origin)
    template_form = for_template(msgs, parse_arguments=not support["string_arguments"])
    return template_form, tools or None, "text" if as_text else "template", origin


def turn_text(message: dict) -> str:
    """An assistant turn as one text: its reasoning as `<think>\\n...\\n</think>\\n\\n` when it has any, its
    content, then each call in the text form (`tool_call_text`), separated by newlines; what a turn
    becomes for a template that ignores calls and reasoning, and what exports that take a reply as a
    string get (null fields, as Arrow rows have them, allowed)."""
    return _turn_text(message, calls=True, reasoning=True)


def _turn_text(message: dict, calls: bool, reasoning: bool) -> str:
    text = message.get("content") or ""
    blocks = "\n".join(tool_call_text(c) for c in message.get("tool_calls") or ()) if calls else ""
    text = f"{text}\n{blocks}" if text and blocks else text or blocks
    thought = _reasoning(message).strip("\n") if reasoning else ""
    return f"<think>\n{thought}\n</think>\n\n{text}" if thought else text


def _reasoning(m: dict) -> str:
    """A turn's reasoning ("" when it has none, or only whitespace)."""
    thought = m.get("reasoning_content")
    return thought if isinstance(thought, str) and thought.strip() else ""


def _as_text(m: dict, calls: bool, reasoning: bool) -> dict:
    """Turn m with its calls (`calls`) and its reasoning (`reasoning`) written into its content."""
    calls = calls and bool(m.get("tool_calls"))
    reasoning = reasoning and m["role"] == "assistant" and bool(_reasoning(m))
    if not (calls or reasoning):
        return m
    out = {k: v for k, v in m.items() if not (calls and k == "tool_calls" or reasoning and k == "reasoning_content")}
    out["content"] = _turn_text(m, calls, reasoning)
    return out


def _schemas_as_text(msgs: list[dict], origin: list, tools: list[dict], system_role: bool
                     ) -> tuple[list[dict], list]:
    """The schemas' text in the system turn (prepended when there is none) or, for a template without a
    system role, at the top of the first user turn (prepended when there is none)."""
    block = tools_text(tools)
    if system_role:
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            return [{**msgs[0], "content": f"{system}\n\n{block}" if system else block}, *msgs[1:]], origin
        return [{"role": "system", "content": block}, *msgs], [None, *origin]
    first = next((j for j, m in enumerate(msgs) if m["role"] == "user"), None)
    if first is None:
        return [{"role": "user", "content": block}, *msgs], [None, *origin]
    user = msgs[first]["content"]
    msgs = list(msgs)
    msgs[first] = {**msgs[first], "content": f"{block}\n\n{user}" if user else block}
    return msgs, origin


def _results_as_text(msgs: list[dict], origin: list) -> tuple[list[dict], list]:
    out, out_origin = [], []
    for m, o in zip(msgs, origin):
        if m["role"] != "tool":
            out.append(m)
            out_origin.append(o)
            continue
        block = f"<tool_response>\n{m['content']}\n</tool_response>"
        if out and out[-1].get("_results"):  # a run of results is one user turn (no user/user pairs)
            out[-1]["content"] += "\n" + block
        else:
            out.append({"role": "user", "content": block, "_results": True})
            out_origin.append(o)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out], out_origin
