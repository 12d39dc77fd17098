"""Converters for chat and instruction formats: messages, sharegpt, prompt/completion, Q&A, alpaca, HH.

Each `convert_*` takes a raw dict and returns `(messages, ground_truth)`, the ground truth being a
reference-answer field that only its format has (MATH's `answer`), else None; outcome fields, the
`ground_truth` field, the rules that read a ground truth off the reply (`#### N`, `\\boxed{}`) and
final validation are handled once, in `adapters.normalize`, so every format agrees on them.
"""

from __future__ import annotations

import re
from typing import Any

from curate.formats import tools
from curate.formats.records import (
    ROLES,
    BadRecord,
    as_ground_truth,
    check_content,
    first_key,
    message,
    number_text,
    require_list,
    require_str,
    type_name,
)

Converted = tuple[list[dict], str | None]

CHAT_LIST_KEYS = ("messages", "conversation", "conversations")
MESSAGE_LIST_KEYS = (*CHAT_LIST_KEYS, "traj", "trajectory")  # τ-bench: `traj` is a list of messages
COMPLETION_KEYS = ("completion", "response", "answer")
# ShareGPT speaker names seen in the wild (ShareGPT, LLaMA-Factory, Glaive/ToolACE-style tool data).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", **tools.ROLE_ALIASES,
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _message_dict(index: int, item: Any) -> dict:
    if not isinstance(item, dict):
        raise BadRecord(f"message {index}: must be an object, got {type_name(item)}")
    return item


def _content_text(index: int, content: Any, may_be_empty: bool = False) -> str:
    """OpenAI content may be a list of parts; text parts are joined by newlines, others refused.

    `may_be_empty`: null or blank content is allowed (kept as written, null as "")."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type_name(part)
            if kind != "text" or not isinstance(part.get("text"), str):
                raise BadRecord(f"message {index}: content part {j} is {kind!r}, only text parts are supported")
            texts.append(part["text"])
        content = "\n".join(texts)
    if may_be_empty and (content is None or (isinstance(content, str) and not content.strip())):
        return content or ""
    return check_content(index, content)


def _role(index: int, value: Any, names: dict[str, str], notes: list[str]) -> str:
    """A role name, matched case-insensitively; an alias (tools.ROLE_ALIASES) is noted."""
    role = names.get(value.lower()) if isinstance(value, str) else None
    if role is None:
        raise BadRecord(f"message {index}: unknown role {value!r}" if value is not None else f"message {index}: no 'role'")
    if role != value.lower() and value.lower() in tools.ROLE_ALIASES:
        notes.append(f"role {value.lower()!r} read as {role!r}")
    return role


_OPENAI_ROLES = {**{r: r for r in ROLES}, **tools.ROLE_ALIASES}
_KNOWN_KEYS = frozenset(("role", "content", "tool_calls", "tool_call_id", "name", "function_call", "from", "value",
                         *tools.REASONING_KEYS))


def canonical_message(index: int, role: str, m: dict, content: Any, calls: list[dict] | None,
                      notes: list[str]) -> dict:
    """The canonical message: role, content and the tool fields the turn has (absent ones left out).
    `name` is kept on any turn (OpenAI's participant name; a tool result's tool name); a field that
    cannot be kept is noted."""
    thought = tools.reasoning(index, m) if role == "assistant" else None
    out = message(role, _content_text(index, content, may_be_empty=role in ("system", "tool") or bool(calls or thought)))
    if calls:
        if role != "assistant":
            raise BadRecord(f"message {index}: a {role} turn cannot have tool_calls")
        out["tool_calls"] = calls
    if role == "tool":
        call_id = tools.tool_call_id(index, m)
        if call_id is not None:
            out["tool_call_id"] = call_id
    name = tools.optional_str(index, m, "name")
    if name is not None:
        out["name"] = name
    if thought is not None:
        out["reasoning_content"] = thought
    if len(m) > 2:
        notes.extend(_dropped(m, role))
    return out


def _dropped(m: dict, role: str) -> list[str]:
    """Notes for what a message has and the canonical message cannot keep (null fields are absent)."""
    out = [f"message field {k!r} not kept" for k, v in m.items() if k not in _KNOWN_KEYS and v is not None]
    if role != "tool" and m.get("tool_call_id") is not None:
        out.append(f"tool_call_id on a {role} turn not kept")
    if role != "assistant" and any(m.get(k) is not None for k in tools.REASONING_KEYS):
        out.append(f"reasoning on a {role} turn not kept")
    if m.get("tool_calls") and m.get("function_call") is not None:
        out.append("legacy function_call beside tool_calls not kept")
    return out


def role_content_messages(items: list, offset: int = 0, notes: list[str] | None = None) -> list[dict]:
    """OpenAI-style [{role, content, tool_calls?, ...}] -> canonical messages; `offset` numbers messages
    in errors. A legacy `function_call` on an assistant turn is read as its one tool call."""
    out, notes = [], [] if notes is None else notes
    for i, item in enumerate(items, start=offset):
        if type(item) is dict and len(item) == 2:  # the common case, checked inline (ingest's hot path):
            role, content = item.get("role"), item.get("content")  # a plain {role, content} with text
            if role in ROLES and type(content) is str and content.isascii() and content and not content.isspace():
                out.append({"role": role, "content": content})
                continue
        m = _message_dict(i, item)
        role = _role(i, m.get("role"), _OPENAI_ROLES, notes)
        calls = tools.tool_calls(i, m.get("tool_calls"), notes)
        if calls is None and m.get("function_call") is not None and role == "assistant":
            calls = tools.sharegpt_calls(i, [m["function_call"]], notes)
        out.append(canonical_message(i, role, m, m.get("content"), calls, notes))
    return out


def message_list_key(raw: dict) -> str:
    """The first of MESSAGE_LIST_KEYS holding a list (τ-bench keeps its messages in `traj`)."""
    for key in MESSAGE_LIST_KEYS:
        if isinstance(raw.get(key), list):
            return key
    return first_key(raw, MESSAGE_LIST_KEYS) or "messages"


def convert_messages(raw: dict, notes: list[str]) -> Converted:
    """OpenAI-style messages (`messages`, `conversation(s)`, τ-bench's `traj`) -> canonical messages, no
    ground truth; BadRecord with the reason."""
    return role_content_messages(require_list(raw, message_list_key(raw)), notes=notes), None


def convert_sharegpt(raw: dict, notes: list[str]) -> Converted:
    """ShareGPT turns ({from, value}, or {role, content}) after an optional top-level `system` string ->
    canonical messages, no ground truth; `function_call` turns become tool calls. BadRecord with the reason."""
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRecord(f"field 'system' must be a string, got {type_name(system)}")
    out = [message("system", system)] if system and system.strip() else []
    for i, item in enumerate(require_list(raw, first_key(raw, CHAT_LIST_KEYS) or "conversations")):
        m = _message_dict(i, item)
        speaker = m.get("from", m.get("role"))
        role = _role(i, speaker, SHAREGPT_ROLES, notes)
        value = m.get("value", m.get("content"))
        if isinstance(speaker, str) and speaker.lower() == "function_call":
            out.append(canonical_message(i, role, m, "", tools.sharegpt_calls(i, value, notes), notes))
        else:
            out.append(canonical_message(i, role, m, value, tools.tool_calls(i, m.get("tool_calls"), notes), notes))
    return out, None


def _answer_text(raw: dict, key: str) -> str:
    """A reply field that may hold a bare number (a numeric `answer` column): written as `number_text`
    ("8", not "8.0"); NaN is a missing value."""
    value = raw.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = number_text(value)
        if text is None:
            raise BadRecord(f"field '{key}' is missing (NaN)")
        return text
    return require_str(raw, key)


def _side(raw: dict, key: str, role: str, offset: int, notes: list[str]) -> list[dict]:
    """One side of a prompt/completion pair: a plain string or a list of messages (TRL conversational);
    a bare number as a reply is its text."""
    value = raw[key]
    if isinstance(value, str):
        return [message(role, check_content(offset, value))]
    if isinstance(value, list):
        return role_content_messages(value, offset, notes)
    if role == "assistant" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [message(role, _answer_text(raw, key))]
    raise BadRecord(f"field '{key}' must be a string or a list of messages, got {type_name(value)}")


def convert_prompt_completion(raw: dict, notes: list[str]) -> Converted:
    """`prompt` and the first of completion, response, answer, each a string or a list of messages (a bare
    number as a reply is its text) -> the user side, then the assistant side; no ground truth. BadRecord
    with the reason (no reply field, a side that is neither text nor messages, blank content)."""
    key = first_key(raw, COMPLETION_KEYS) or "completion"
    if key not in raw:
        raise BadRecord("no 'completion', 'response' or 'answer' field")
    prompt = _side(raw, "prompt", "user", 0, notes)
    return prompt + _side(raw, key, "assistant", len(prompt), notes), None


def convert_question_answer(raw: dict, notes: list[str]) -> Converted:
    """GSM8K {question, answer} (the worked solution is the reply) or MATH {problem, solution} (its
    `answer` field, if any, is the ground truth) -> a user and an assistant message; BadRecord for a missing
    or blank field."""
    if "question" in raw:  # GSM8K: the answer is the worked solution; its "#### N" is read in adapters
        answer = _answer_text(raw, "answer")
        return [message("user", require_str(raw, "question")), message("assistant", answer)], None
    # MATH: the reference answer field, whatever its length (else adapters take the last \boxed{})
    solution = require_str(raw, "solution")
    truth = as_ground_truth(raw.get("answer"))
    return [message("user", require_str(raw, "problem")), message("assistant", solution)], truth


def _optional_str(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field '{key}' must be a string, got {type_name(value)}")
    return value


def convert_alpaca(raw: dict, notes: list[str]) -> Converted:
    """Alpaca (+ LLaMA-Factory's `system`/`history`); a Self-Instruct task is demonstrated by its first
    instance, and one with more keeps all of them in metadata (see adapters._partly_read), with a note."""
    instruction = require_str(raw, "instruction")
    example = raw
    if "output" not in raw:
        instances = require_list(raw, "instances")
        if not instances or not isinstance(instances[0], dict):
            raise BadRecord("field 'instances' must hold at least one {input, output} object")
        example = instances[0]
        if len(instances) > 1:
            notes.append("Self-Instruct task with several instances: the first is the demonstration, all are kept "
                         "in metadata")
    extra = _optional_str(example, "input")
    out = [message("system", raw["system"])] if _optional_str(raw, "system").strip() else []
    for turn in raw.get("history") or []:
        if not (isinstance(turn, list) and len(turn) == 2):
            raise BadRecord("field 'history' must be a list of [instruction, response] pairs")
        out += [message("user", turn[0]), message("assistant", turn[1])]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return out + [message("user", user), message("assistant", require_str(example, "output"))], None


def convert_hh(raw: dict, notes: list[str]) -> Converted:
    """A preference pair; the demonstration is `chosen` (`rejected` is not one).

    Anthropic HH keeps the whole dialogue in `chosen`, as text turns each opened by a blank line and
    "Human:" or "Assistant:"; TRL's preference format has `chosen` as a reply string or a message
    list, with an optional `prompt`.
    """
    if "prompt" in raw:
        prompt = _side(raw, "prompt", "user", 0, notes)
        return prompt + _side(raw, "chosen", "assistant", len(prompt), notes), None
    if isinstance(raw.get("chosen"), list):
        return role_content_messages(raw["chosen"], notes=notes), None
    text = require_str(raw, "chosen")
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    pieces = _HH_TURN.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        raise BadRecord("field 'chosen' must be a dialogue of '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    out = []
    for i, (speaker, content) in enumerate(zip(pieces[1::2], pieces[2::2])):
        out.append(message(roles[speaker], check_content(i, content.strip())))
    return out, None
