"""The pieces every input adapter shares: the result type, the error type and message validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class BadRecord(ValueError):
    """A record that cannot become a canonical record; `str(e)` is the human-readable reason."""


@dataclass
class Normalized:
    """A record in canonical form, before the ingest stage adds id, source and source_index."""

    format: str
    messages: list[dict]
    ground_truth: str | None = None
    reward: float | None = None
    tools: str | None = None          # JSON text of the function schemas (curate.messages.dump_tools)
    notes: tuple[str, ...] = ()       # what was read differently from how it was written, for the manifest


def type_name(value: Any) -> str:
    """JSON-ish type names for error messages ("str", "list", "null", ...)."""
    return "null" if value is None else type(value).__name__


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def require_str(raw: dict, key: str) -> str:
    """`raw[key]` as a non-blank string, else BadRecord naming the field."""
    value = raw.get(key)
    if not isinstance(value, str):
        raise BadRecord(f"field '{key}' must be a string, got {type_name(value)}")
    if not value.strip():
        raise BadRecord(f"field '{key}' is empty")
    return value


def require_list(raw: dict, key: str) -> list:
    value = raw.get(key)
    if not isinstance(value, list):
        raise BadRecord(f"field '{key}' must be a list, got {type_name(value)}")
    return value


def first_key(raw: dict, keys: tuple[str, ...]) -> str | None:
    """The first of `keys` present in `raw` with a non-null value."""
    for k in keys:  # a plain loop: this runs several times per record on the ingest hot path
        if raw.get(k) is not None:
            return k
    return None


def check_content(index: int, content: Any) -> str:
    """A message's content must be a non-blank string; kept exactly as written (no stripping)."""
    if content is None:
        raise BadRecord(f"message {index}: no content")
    if not isinstance(content, str):
        raise BadRecord(f"message {index}: content must be a string, got {type_name(content)}")
    if not content.strip():
        raise BadRecord(f"message {index}: content is empty")
    if not content.isascii():  # checked here first: the label below costs more than the check
        check_unicode(f"message {index}: content", content)
    return content


def check_unicode(what: str, text: str) -> str:
    """Refuse an unpaired surrogate (JSON allows "\\ud800"; UTF-8, Arrow and tokenizers do not)."""
    if not text.isascii():  # fast path: almost all text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord(f"{what} has an unpaired surrogate (U+{ord(text[e.start]):04X} at "
                            f"character {e.start}), which is not valid Unicode") from None
    return text


def validate_messages(messages: list[dict]) -> list[dict]:
    """Check the conversation as a whole; returns it unchanged.

    Content must be a string; it may be blank only in system and tool turns and in assistant turns
    that call tools or carry separate reasoning."""
    roles = set()
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRecord(f"message {i}: unknown role {role!r}")
        roles.add(role)
        # the common case without a call: a non-blank ASCII string (check_content says what is wrong)
        if not (type(content) is str and content.isascii() and content and not content.isspace()):
            if type(content) is str and (role in ("system", "tool") or m.get("tool_calls") or m.get("reasoning_content")):
                check_unicode(f"message {i}: content", content)
            else:
                check_content(i, content)
    if not messages:
        raise BadRecord("no messages")
    if roles == {"system"}:
        raise BadRecord("only system turns")
    if "assistant" not in roles:
        raise BadRecord("no assistant turn")
    return messages


def as_outcome(key: str, value: Any) -> float:
    """A recorded outcome as a float: booleans are 1.0/0.0 (checked first: bool is an int in Python)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if not isinstance(value, (int, float)):
        raise BadRecord(f"field '{key}' must be a number or boolean, got {type_name(value)}")
    if not math.isfinite(value):
        raise BadRecord(f"field '{key}' must be finite, got {value}")
    return float(value)


OUTCOME_KEYS = ("reward", "score", "success", "result")


def recorded_reward(raw: dict) -> float | None:
    """The first present of reward, score, success, result (null counts as absent)."""
    key = first_key(raw, OUTCOME_KEYS)
    return None if key is None else as_outcome(key, raw[key])


def as_ground_truth(value: Any) -> str | None:
    """A `ground_truth` field as a string; structured values become canonical JSON."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    else:
        text = str(value)
    return text if text.strip() else None


def hash_answer(text: str, last_line_only: bool = False) -> str | None:
    """GSM8K's final answer: what follows the last "####", stripped, commas kept as written.

    With `last_line_only` the "####" must open the last non-blank line: in free-form completions a
    "####" elsewhere is more likely a Markdown heading than an answer marker.
    """
    if last_line_only:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or not lines[-1].lstrip().startswith("####"):
            return None
    _, sep, answer = text.rpartition("####")
    return (answer.strip() or None) if sep else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text`, braces balanced (MATH's answer convention)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip() or None
    return None
