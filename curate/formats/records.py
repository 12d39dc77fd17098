"""The pieces every input adapter shares: the result type, the error type and message validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal
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
    metadata: str | None = None       # JSON text of the input fields the format does not use (not in the id)


def type_name(value: Any) -> str:
    """JSON-ish type names for error messages ("str", "list", "null", ...)."""
    return "null" if value is None else type(value).__name__


def message(role: str, content: str) -> dict:
    """A canonical {role, content} message (content as given: not checked here)."""
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
    """`raw[key]` when it is a list, else BadRecord naming the field."""
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


# Integral floats below this print as integers: above it a float no longer holds every integer exactly,
# so integer text would claim digits the value does not have (1e20 stays "1e+20").
_EXACT_INT = 2.0 ** 53


def number_text(value: int | float | Decimal) -> str | None:
    """A number as the text a person would write: an int as is; an integral float as an int ("8", not
    "8.0": pandas turns an int column with a gap into floats); other floats in Python's shortest
    round-trip form ("0.5", "1e-07", "inf"); a Decimal without trailing zeros. NaN is missing: None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if value.is_nan():
            return None
        if value.is_finite() and value == value.to_integral_value():
            return str(int(value))
        return str(value.normalize())
    value = float(value)
    if value != value:
        return None
    if value.is_integer() and abs(value) < _EXACT_INT:
        return str(int(value))
    return float.__repr__(value)


def canonical_numbers(value: Any) -> Any:
    """`value` with integral floats as ints and NaN as None, at any depth (before writing JSON text)."""
    if type(value) is float:
        if value != value:
            return None
        return int(value) if value.is_integer() and abs(value) < _EXACT_INT else value
    if isinstance(value, dict):
        return {k: canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_numbers(v) for v in value]
    return value


def as_outcome(key: str, value: Any) -> float | None:
    """A recorded outcome as a float: booleans are 1.0/0.0 (checked first: bool is an int in Python).
    NaN is a missing outcome (None), as pandas writes a gap; an infinite one is refused."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if not isinstance(value, (int, float)):
        raise BadRecord(f"field '{key}' must be a number or boolean, got {type_name(value)}")
    if value != value:
        return None
    if not math.isfinite(value):
        raise BadRecord(f"field '{key}' must be finite, got {value}")
    return float(value)


OUTCOME_KEYS = ("reward", "score", "success", "result")


def outcome_key(raw: dict) -> str | None:
    """The first of OUTCOME_KEYS with a value (null and NaN count as absent)."""
    for k in OUTCOME_KEYS:  # a plain loop: this runs for every record
        v = raw.get(k)
        if v is not None and not (type(v) is float and v != v):
            return k
    return None


def recorded_reward(raw: dict) -> float | None:
    """The first present of reward, score, success, result (null and NaN count as absent)."""
    key = outcome_key(raw)
    return None if key is None else as_outcome(key, raw[key])


def as_ground_truth(value: Any) -> str | None:
    """A `ground_truth` (or `answer`) value as a string: a number as `number_text` ("8", never "8.0"), a
    boolean as "true"/"false", a structured value as canonical JSON (integral floats as ints, NaN as
    null). None, NaN and blank text are no ground truth."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, (int, float, Decimal)):
        text = number_text(value)
    elif isinstance(value, (dict, list)):
        text = json.dumps(canonical_numbers(value), sort_keys=True, ensure_ascii=False, default=str)
    else:
        text = str(value)
    return text if text is not None and text.strip() else None


def hash_answer(text: str, last_line_only: bool = False) -> str | None:
    """GSM8K's final answer: what follows the last "####", stripped, commas kept as written.

    With `last_line_only` the "####" must open the last non-blank line: in free-form completions a
    "####" elsewhere is more likely a Markdown heading than an answer marker.
    """
    at = text.rfind("####")
    if at < 0:  # the common case, found without splitting lines
        return None
    if last_line_only and not _opens_last_line(text, at):
        return None
    return text[at + 4:].strip() or None


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits at


def _opens_last_line(text: str, at: int) -> bool:
    """Whether the line of the "####" at `at` (the last one) is the last non-blank line and opens with
    "####" (after spaces; "#####5" opens so too). Reads only the lines around it (this runs for every
    record), with str.splitlines' idea of a line break."""
    rest = text[at:]
    if not rest.isprintable():  # a line break after it (no line break is printable): the rest must be blank
        for line in rest.splitlines()[1:]:
            if line.strip():
                return False
    if at == 0 or text[at - 1] in _LINE_BREAKS:  # the common case: "####" right at a line's start
        return True
    window = text[max(0, at - 256):at]
    before = (window + "#").splitlines()[-1][:-1]  # the sentinel keeps a line that is empty before "####"
    if len(before) == len(window) and at > 256:  # no line break in the window: the line is long
        before = (text[:at] + "#").splitlines()[-1][:-1]
    return (before.lstrip() + "####").startswith("####")


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
