"""The canonical chat message and the forms it leaves curate in.

A canonical message (schemas/record.schema.json) has `role` and `content` (a string, possibly empty for an
assistant turn that only calls tools) and, only when the input had them, `tool_calls` (a list of
`{"id", "type": "function", "function": {"name", "arguments"}}`, `arguments` the JSON text of the call's
arguments), `tool_call_id`, `name` and `reasoning_content`. A record's `tools` is the JSON text of its
function schemas in OpenAI's form `{"type": "function", "function": {...}}`.

Arrow rows carry every field of the message struct, null where a message has none; `compact` removes
those nulls so that `'tool_calls' in message` (how Llama-3.1's and other templates test for a call)
means what it says.
"""

from __future__ import annotations

import json

OPTIONAL_FIELDS = ("tool_calls", "tool_call_id", "name", "reasoning_content")


def compact(message: dict) -> dict:
    """`message` without its null optional fields (`role` and `content` are always kept)."""
    return {k: v for k, v in message.items() if v is not None or k in ("role", "content")}


def compact_all(messages: list[dict] | None) -> list[dict]:
    """`compact` of every message; None (an Arrow null) gives []."""
    return [compact(m) for m in messages or ()]


def has_tool_fields(messages: list[dict]) -> bool:
    """Whether any message carries a tool call, a tool-call id, a name or reasoning."""
    return any(m.get(k) is not None for m in messages for k in OPTIONAL_FIELDS)


def parse_tools(text: str | None) -> list[dict] | None:
    """A `tools` column value (JSON text) as the list of schemas `apply_chat_template(tools=...)` takes."""
    return None if text is None else json.loads(text)


def dump_tools(tools: list[dict] | None) -> str | None:
    """The `tools` column value: compact JSON text, key order as given, non-ASCII kept."""
    return None if tools is None else json.dumps(tools, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def call_arguments(text: str):
    """A call's `arguments` as chat templates expect them (transformers' tool-use docs: a dict):
    the parsed JSON object, or the text itself when it is not a JSON object (then templates that
    write strings as they are, e.g. Qwen's, still show it as the input had it)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return text
    return value if isinstance(value, dict) else text


def for_template(messages: list[dict], parse_arguments: bool = True) -> list[dict]:
    """Messages as `tokenizer.apply_chat_template` takes them: compacted, calls without null fields,
    call arguments parsed (or, `parse_arguments=False`, the JSON text as given: for templates that
    write a string as it is)."""
    out = []
    for m in compact_all(messages):
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_template_call(c, parse_arguments) for c in m["tool_calls"]]}
        out.append(m)
    return out


def _template_call(call: dict, parse_arguments: bool) -> dict:
    """A call without null fields (a call with no id), its arguments parsed if asked."""
    out = {k: v for k, v in call.items() if v is not None}
    if parse_arguments:
        out["function"] = {**call["function"], "arguments": call_arguments(call["function"]["arguments"])}
    return out
