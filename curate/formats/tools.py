"""Tool-calling fields of a raw record -> their canonical form (see curate/messages.py).

OpenAI chat (and τ-bench, vLLM, most agent logs) put calls on assistant turns as `tool_calls` and
results in `role: "tool"` turns; LLaMA-Factory's ShareGPT layout has `function_call` turns whose value
is the JSON text of `{"name", "arguments"}` (or a list of them) and `observation` turns. Both become the
same canonical message. Everything here raises BadRecord with the reason, naming the message.
"""

from __future__ import annotations

import json
from typing import Any

from curate.formats.records import BadRecord, check_unicode, type_name
from curate.messages import dump_tools

# Roles read as another, each with a note in the manifest (never silently): OpenAI's legacy `function`
# results and Llama-3's `ipython` are tool results.
ROLE_ALIASES = {"function": "tool", "ipython": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # vLLM/DeepSeek, OpenRouter, gpt-oss


def _json_text(what: str, value: Any, notes: list[str]) -> str:
    """`arguments` as JSON text: a string is kept as given (noted when it is not JSON), an object is
    written with json.dumps (NaN or infinity refused: they are not JSON)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            notes.append("tool call arguments that are not valid JSON kept as given")
        return check_unicode(what, value)
    if isinstance(value, dict):
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except ValueError:
            raise BadRecord(f"{what} hold NaN or infinity, which JSON does not allow") from None
        return check_unicode(what, text)
    raise BadRecord(f"{what} must be a JSON string or an object, got {type_name(value)}")


def _id(what: str, value: Any) -> str | None:
    """A call id or tool_call_id: a string, or an integer written as one."""
    if value is None or isinstance(value, str):
        return value if value is None else check_unicode(what, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadRecord(f"{what} must be a string or an integer, got {type_name(value)}")


# What a call (OpenAI's {id, type, function: {name, arguments}}, or a bare {name, arguments|parameters}) holds
_CALL_KEYS = frozenset(("id", "type", "function", "name", "arguments", "parameters"))


def _call(where: str, j: int, call: Any, notes: list[str]) -> dict:
    what = f"{where}: tool call {j}"
    if not isinstance(call, dict):
        raise BadRecord(f"{what} must be an object, got {type_name(call)}")
    fn = call.get("function", call)  # {"function": {...}} (OpenAI) or a bare {"name", "arguments"}
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise BadRecord(f"{what} has no function name")
    kind = call.get("type") or "function"
    if kind != "function":
        raise BadRecord(f"{what} has type {kind!r}; only function calls are supported")
    args = fn.get("arguments", fn.get("parameters", {}))
    read = _CALL_KEYS - ({"parameters"} if "arguments" in fn else set())  # `arguments` wins over `parameters`
    unread = [k for k, v in call.items() if k not in read and v is not None]
    unread += [f"function.{k}" for k, v in fn.items() if fn is not call and k not in read and v is not None]
    if unread:
        notes.append(f"tool call fields {unread} not kept")
    return {"id": _id(f"{what} id", call.get("id")), "type": "function",
            "function": {"name": check_unicode(f"{what} name", fn["name"]),
                         "arguments": _json_text(f"{what} arguments", args, notes)}}


def tool_calls(index: int, value: Any, notes: list[str]) -> list[dict] | None:
    """A message's `tool_calls` (list of calls); None or [] gives None."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRecord(f"message {index}: tool_calls must be a list, got {type_name(value)}")
    return [_call(f"message {index}", j, c, notes) for j, c in enumerate(value)]


def sharegpt_calls(index: int, value: Any, notes: list[str]) -> list[dict]:
    """A ShareGPT `function_call` turn's value: JSON text of {"name", "arguments"} or a list of them."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except ValueError as e:
        raise BadRecord(f"message {index}: function_call value is not JSON ({e.msg})") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise BadRecord(f"message {index}: function_call value is an empty list")
    return [_call(f"message {index}", j, c, notes) for j, c in enumerate(calls)]


def optional_str(index: int, message: dict, key: str) -> str | None:
    """`message[key]`, None when absent or null; BadRecord when it is not a string or holds an unpaired
    surrogate."""
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRecord(f"message {index}: {key} must be a string, got {type_name(value)}")
    return check_unicode(f"message {index}: {key}", value)


def tool_call_id(index: int, message: dict) -> str | None:
    """A tool turn's `tool_call_id` (an integer as its text), None when absent; BadRecord for another type."""
    return _id(f"message {index}: tool_call_id", message.get("tool_call_id"))


def reasoning(index: int, message: dict) -> str | None:
    """The turn's separate reasoning: the first non-blank of REASONING_KEYS, else None."""
    for key in REASONING_KEYS:
        text = optional_str(index, message, key)
        if text is not None and text.strip():
            return text
    return None


def _schema(i: int, item: Any) -> dict:
    if not isinstance(item, dict):
        raise BadRecord(f"tools item {i} must be an object, got {type_name(item)}")
    if item.get("type") == "function" and isinstance(item.get("function"), dict):
        fn = item["function"]
    elif "function" not in item and isinstance(item.get("name"), str):
        # LLaMA-Factory / glaive: a bare schema; OpenAI's Responses API: the same with "type": "function"
        fn = {k: v for k, v in item.items() if not (k == "type" and v == "function")}
        item = {"type": "function", "function": fn}
    else:
        raise BadRecord(f"tools item {i} is neither {{'type': 'function', 'function': {{...}}}} nor "
                        f"{{'name': ..., 'parameters': ...}}")
    if not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise BadRecord(f"tools item {i} has no function name")
    return item


def parse_tools(value: Any, what: str = "field 'tools'") -> str | None:
    """A `tools` value (a list of function schemas, or its JSON text) -> the canonical `tools` column
    value (JSON text, each schema in OpenAI's wrapped form). None, "", [] and "[]" give None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise BadRecord(f"{what} is not valid JSON ({e.msg})") from None
    if isinstance(value, dict):  # one schema given alone
        value = [value]
    if not isinstance(value, list):
        raise BadRecord(f"{what} must be a list of function schemas, got {type_name(value)}")
    schemas = [_schema(i, t) for i, t in enumerate(value)]
    try:
        text = dump_tools(schemas) if schemas else None
    except ValueError:  # json.dumps(allow_nan=False)
        raise BadRecord(f"{what} hold NaN or infinity, which JSON does not allow") from None
    return text if text is None else check_unicode(what, text)


def load_tools_file(path: str) -> str:
    """--tools FILE: a JSON list of function schemas (τ-bench ships `airline_tools.json`) -> the canonical
    `tools` text. ValueError naming the file when it cannot be read or is not such a list."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # missing, a folder, unreadable, not JSON, too deep
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"--tools {path}: cannot read a JSON list of function schemas ({why})") from None
    try:
        text = parse_tools(value, what=f"--tools {path}")
    except BadRecord as e:
        raise ValueError(str(e) if str(e).startswith("--tools") else f"--tools {path}: {e}") from None
    if text is None:
        raise ValueError(f"--tools {path}: the list of function schemas is empty")
    return text
