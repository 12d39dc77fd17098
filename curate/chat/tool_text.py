"""Tools for templates that know nothing of them (SmolLM2's ChatML, most base-model templates): what a
template renders of tool calls, schemas and tool turns (`tool_support`), and the text form curate writes
for what it ignores (`prepare`), the Hermes/Qwen convention:

* each call is appended to its turn's content as `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`
  (one block per call, blocks separated by a newline, ARGS the arguments' JSON object);
* tool schemas go into the system turn (one is prepended when there is none): TOOLS_HEADER, then
  `<tools>`, one JSON schema per line, `</tools>`;
* tool results, when the template ignores the `tool` role, become one user turn per run of results,
  each result as `<tool_response>\n...\n</tool_response>`."""

from __future__ import annotations

import hashlib
import json

from curate.chat.templates import TemplateError, render_template, template_text
from curate.messages import call_arguments, compact_all, for_template

# Written into the system turn before the schemas when the template ignores `tools` (see module doc).
TOOLS_HEADER = ("You may call one or more functions to assist with the user query. The function signatures "
                "are within <tools></tools> XML tags. To call a function, reply with a JSON object holding its "
                "name and arguments within <tool_call></tool_call> XML tags.")

# The fixed conversation `tool_support` renders.
_PROBE_RESULT = "curate-probe-result-5f1c"
_PROBE_USER = {"role": "user", "content": "What is the weather in Paris?"}
_PROBE_CALL = {"id": "call_0", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
_PROBE_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

_SUPPORT: dict[str, dict] = {}  # tool_support per template sha256



def tool_support(tokenizer, chat_template: str | None = None) -> dict[str, bool]:
    """What the template renders of tools: {"tool_calls": bool, "tools": bool, "tool_role": bool}.

    Found by rendering a fixed conversation with and without each feature (equal text, or an error,
    means ignored): `tool_calls`, an assistant turn's calls; `tools`, the schemas passed as
    `apply_chat_template(tools=...)`; `tool_role`, the text of a `tool` turn. Cached per template text."""
    return dict(_support(tokenizer, template_text(tokenizer, chat_template)))


def _support(tokenizer, template: str) -> dict[str, bool]:
    key = hashlib.sha256(template.encode("utf-8")).hexdigest()
    if key not in _SUPPORT:
        _SUPPORT[key] = _detect_support(tokenizer, template)
    return _SUPPORT[key]


def _detect_support(tokenizer, template: str) -> dict[str, bool]:
    def text(messages, tools=None):
        try:
            return render_template(tokenizer, template, for_template(messages), tools)
        except TemplateError:
            return None

    calling = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    with_calls = text([_PROBE_USER, calling])
    without = text([_PROBE_USER, {"role": "assistant", "content": ""}])
    calls = with_calls is not None and (with_calls != without if without is not None else
                                        "get_weather" in with_calls)
    reply = {"role": "assistant", "content": "It is sunny."}
    plain = text([_PROBE_USER, reply])
    with_tools = text([_PROBE_USER, reply], [_PROBE_TOOL])
    tools = with_tools is not None and with_tools != plain
    if not calls:
        calling = {"role": "assistant", "content": tool_call_text(_PROBE_CALL)}
    result = {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "call_0", "name": "get_weather"}
    with_result = text([_PROBE_USER, calling, result, reply])
    return {"tool_calls": calls, "tools": tools, "tool_role": with_result is not None and _PROBE_RESULT in with_result}


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

    Messages are compacted (null fields dropped) and call arguments parsed (`messages.for_template`);
    what the template ignores of tools is written as text (module doc). tool_rendering is None when the
    record has no tools, calls or tool turns, "text" when any of them was written as text, else
    "template". origin[j] is the index in `messages` of prepared message j (None for a system turn
    added to hold the schemas; a run of tool results merged into one user turn has its first index)."""
    return prepare_for(tokenizer, template_text(tokenizer, chat_template, tools), messages, tools)


def prepare_for(tokenizer, template: str, messages: list[dict], tools: list[dict] | None):
    msgs = compact_all(messages)
    origin: list[int | None] = list(range(len(msgs)))
    has_calls = any(m.get("tool_calls") for m in msgs)
    has_results = any(m["role"] == "tool" for m in msgs)
    if not (tools or has_calls or has_results):
        return for_template(msgs), None, None, origin
    support = _support(tokenizer, template)
    as_text = False
    if has_calls and not support["tool_calls"]:
        as_text = True
        msgs = [_calls_as_text(m) if m.get("tool_calls") else m for m in msgs]
    if has_results and not support["tool_role"]:
        as_text = True
        msgs, origin = _results_as_text(msgs, origin)
    if tools and not support["tools"]:
        as_text = True
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs = [{**msgs[0], "content": f"{system}\n\n{tools_text(tools)}" if system else tools_text(tools)},
                    *msgs[1:]]
        else:
            msgs, origin = [{"role": "system", "content": tools_text(tools)}, *msgs], [None, *origin]
        tools = None
    return for_template(msgs), tools or None, "text" if as_text else "template", origin


def turn_text(message: dict) -> str:
    """An assistant turn as one text: its content, then each call in the text form (`tool_call_text`),
    separated by newlines; what a turn becomes for a template that ignores calls, and what exports that
    take a reply as a string get (null fields, as Arrow rows have them, allowed)."""
    content = message.get("content") or ""
    blocks = "\n".join(tool_call_text(c) for c in message.get("tool_calls") or ())
    return f"{content}\n{blocks}" if content and blocks else content or blocks


def _calls_as_text(m: dict) -> dict:
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    out["content"] = turn_text(m)
    return out


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
