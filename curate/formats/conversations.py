"""Converters for chat and instruction formats: messages, sharegpt, prompt/completion, Q&A, alpaca, HH.

Each `convert_*` takes a raw dict and returns `(messages, ground_truth)`; outcome fields, the
`ground_truth` field and final validation are handled once, in `adapters.normalize`.
"""

from __future__ import annotations

import re
from typing import Any

from curate.formats.records import (
    BadRecord,
    as_ground_truth,
    check_content,
    first_key,
    hash_answer,
    last_boxed,
    message,
    require_list,
    require_str,
    type_name,
)

Converted = tuple[list[dict], str | None]

CHAT_LIST_KEYS = ("messages", "conversation", "conversations")
COMPLETION_KEYS = ("completion", "response", "answer")
# ShareGPT speaker names seen in the wild (ShareGPT, LLaMA-Factory, Glaive/ToolACE-style tool data).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _message_dict(index: int, item: Any) -> dict:
    if not isinstance(item, dict):
        raise BadRecord(f"message {index}: must be an object, got {type_name(item)}")
    return item


def _content_text(index: int, content: Any) -> str:
    """OpenAI content may be a list of parts; text parts are joined by newlines, others refused."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type_name(part)
            if kind != "text" or not isinstance(part.get("text"), str):
                raise BadRecord(f"message {index}: content part {j} is {kind!r}, only text parts are supported")
            texts.append(part["text"])
        content = "\n".join(texts)
    return check_content(index, content)


def role_content_messages(items: list, offset: int = 0) -> list[dict]:
    """OpenAI-style [{role, content}] -> canonical messages; `offset` numbers messages in errors."""
    out = []
    for i, item in enumerate(items, start=offset):
        m = _message_dict(i, item)
        if not isinstance(m.get("role"), str):
            raise BadRecord(f"message {i}: no 'role'")
        out.append(message(m["role"], _content_text(i, m.get("content"))))
    return out


def convert_messages(raw: dict) -> Converted:
    key = first_key(raw, CHAT_LIST_KEYS) or "messages"
    return role_content_messages(require_list(raw, key)), None


def convert_sharegpt(raw: dict) -> Converted:
    out = [message("system", raw["system"])] if isinstance(raw.get("system"), str) and raw["system"].strip() else []
    for i, item in enumerate(require_list(raw, first_key(raw, CHAT_LIST_KEYS) or "conversations")):
        m = _message_dict(i, item)
        speaker = m.get("from", m.get("role"))
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise BadRecord(f"message {i}: unknown role {speaker!r}")
        out.append(message(role, _content_text(i, m.get("value", m.get("content")))))
    return out, None


def _side(raw: dict, key: str, role: str, offset: int) -> list[dict]:
    """One side of a prompt/completion pair: a plain string or a list of messages (TRL conversational)."""
    value = raw[key]
    if isinstance(value, str):
        return [message(role, check_content(offset, value))]
    if isinstance(value, list):
        return role_content_messages(value, offset)
    raise BadRecord(f"field '{key}' must be a string or a list of messages, got {type_name(value)}")


def convert_prompt_completion(raw: dict) -> Converted:
    key = first_key(raw, COMPLETION_KEYS) or "completion"
    if key not in raw:
        raise BadRecord("no 'completion' or 'response' field")
    prompt = _side(raw, "prompt", "user", 0)
    completion = _side(raw, key, "assistant", len(prompt))
    answer = raw[key]
    truth = hash_answer(answer, last_line_only=True) if isinstance(answer, str) else None
    return prompt + completion, truth


def convert_question_answer(raw: dict) -> Converted:
    if "question" in raw:  # GSM8K: the final answer follows "####"
        answer = require_str(raw, "answer")
        return [message("user", require_str(raw, "question")), message("assistant", answer)], hash_answer(answer)
    # MATH: the reference answer field, else the last \boxed{} of the solution
    solution = require_str(raw, "solution")
    truth = as_ground_truth(raw.get("answer")) or last_boxed(solution)
    return [message("user", require_str(raw, "problem")), message("assistant", solution)], truth


def _optional_str(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field '{key}' must be a string, got {type_name(value)}")
    return value


def convert_alpaca(raw: dict) -> Converted:
    """Alpaca (+ LLaMA-Factory's `system`/`history`); Self-Instruct seeds use their first instance."""
    instruction = require_str(raw, "instruction")
    example = raw
    if "output" not in raw:
        instances = require_list(raw, "instances")
        if not instances or not isinstance(instances[0], dict):
            raise BadRecord("field 'instances' must hold at least one {input, output} object")
        example = instances[0]
    extra = _optional_str(example, "input")
    out = [message("system", raw["system"])] if _optional_str(raw, "system").strip() else []
    for turn in raw.get("history") or []:
        if not (isinstance(turn, list) and len(turn) == 2):
            raise BadRecord("field 'history' must be a list of [instruction, response] pairs")
        out += [message("user", turn[0]), message("assistant", turn[1])]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return out + [message("user", user), message("assistant", require_str(example, "output"))], None


def convert_hh(raw: dict) -> Converted:
    """A preference pair; the demonstration is `chosen` (`rejected` is not one).

    Anthropic HH keeps the whole dialogue in `chosen`, as text turns each opened by a blank line and
    "Human:" or "Assistant:"; TRL's preference format has `chosen` as a reply string or a message
    list, with an optional `prompt`.
    """
    if "prompt" in raw:
        prompt = _side(raw, "prompt", "user", 0)
        return prompt + _side(raw, "chosen", "assistant", len(prompt)), None
    if isinstance(raw.get("chosen"), list):
        return role_content_messages(raw["chosen"]), None
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
