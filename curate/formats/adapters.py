"""Raw input records -> canonical conversations (`Normalized`), one format adapter per input style.

The ingest stage calls one function per file, `iter_normalized`, on what `curate.io.readers.read_records`
yielded. Formats are detected per record, first match in `FORMATS` order; each one's detection rule is
the predicate in `_MATCHES`, its conversion a `convert_*` function in conversations.py, agents.py or webshop.py.
Everything a format does not decide (recorded outcome, ground truth, final validation, the input fields
kept as `metadata`) is done once here, so all formats agree on it: the same conversation gets the same
ground truth and id whichever format it was written in.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import math
import os
from decimal import Decimal
from json.encoder import encode_basestring as _encode_str  # the C encoder json.dumps uses (ensure_ascii=False)
from collections.abc import Callable, Iterable, Iterator

from curate.formats.agents import TASK_KEYS, TRANSCRIPT_KEYS, convert_actions, convert_transcript
from curate.formats.conversations import (
    CHAT_LIST_KEYS,
    COMPLETION_KEYS,
    MESSAGE_LIST_KEYS,
    Converted,
    convert_alpaca,
    convert_hh,
    convert_messages,
    convert_prompt_completion,
    convert_question_answer,
    convert_sharegpt,
    message_list_key,
)
from curate.formats.records import (
    ROLES,
    BadRecord,
    Normalized,
    as_ground_truth,
    as_outcome,
    check_unicode,
    first_key,
    hash_answer,
    last_boxed,
    number_text,
    outcome_key,
    type_name,
    validate_messages,
)
from curate.formats.tools import parse_tools
from curate.formats.webshop import convert_webshop_session, group_sessions, is_page_visit
from curate.io.readers import RawError

__all__ = ["FORMATS", "BadRecord", "Normalized", "detect_format", "is_session_line", "iter_normalized", "normalize",
           "record_id"]

FORMATS = (
    "messages", "sharegpt", "prompt_completion", "question_answer", "alpaca",
    "hh", "transcript", "actions", "webshop_session",
)
# An `answer` field longer than this is a worked solution, not a checkable final answer.
MAX_ANSWER_CHARS = 100


def _has_role_list(raw: dict) -> bool:
    """`messages`, or a `conversation(s)`/`traj`/`trajectory` list of {role, ...} (ShareGPT uses {from, value};
    a `traj` string is a text transcript)."""
    if "messages" in raw:
        return True
    for key in MESSAGE_LIST_KEYS[1:]:  # plain loops in these predicates: they run for every record
        v = raw.get(key)
        if isinstance(v, list) and v and isinstance(v[0], dict) and "role" in v[0]:
            return True
    return False


def _has_completion(raw: dict) -> bool:
    if "prompt" not in raw:
        return False
    for key in COMPLETION_KEYS:
        if key in raw:
            return True
    return False


_MATCHES: dict[str, Callable[[dict], bool]] = {
    "messages": _has_role_list,
    "sharegpt": lambda r: "conversations" in r or "conversation" in r,
    "prompt_completion": _has_completion,
    "question_answer": lambda r: {"question", "answer"} <= r.keys() or {"problem", "solution"} <= r.keys(),
    "alpaca": lambda r: "instruction" in r and ("output" in r or "instances" in r),
    "hh": lambda r: "chosen" in r,
    "transcript": lambda r: any(k in r for k in TRANSCRIPT_KEYS),
    "actions": lambda r: "action_history" in r,
    "webshop_session": lambda r: is_page_visit(r) or isinstance(r.get("pages"), list),
}
_CONVERTERS: dict[str, Callable[[dict], Converted]] = {
    "messages": convert_messages,
    "sharegpt": convert_sharegpt,
    "prompt_completion": convert_prompt_completion,
    "question_answer": convert_question_answer,
    "alpaca": convert_alpaca,
    "hh": convert_hh,
    "transcript": convert_transcript,
    "actions": convert_actions,
}


def _keys(raw: dict) -> str:
    keys = sorted(map(str, raw))
    return str(keys[:20])[:-1] + (", ...]" if len(keys) > 20 else "]")


def detect_format(raw: dict) -> str:
    """The first format in `FORMATS` whose keys the record has."""
    if not isinstance(raw, dict):
        raise BadRecord(f"record is not an object, got {type_name(raw)}")
    for fmt in FORMATS:
        if _MATCHES[fmt](raw):
            return fmt
    raise BadRecord(f"unrecognised record: keys {_keys(raw)}")


def normalize(raw: dict, fmt: str = "auto", default_tools: str | None = None) -> Normalized:
    """One raw record -> `Normalized`, or BadRecord with the reason. `fmt` forces a format.

    `tools` comes from the record's own `tools` field (a list of function schemas or its JSON text),
    else `default_tools` (the canonical JSON text of --tools FILE), else None."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(raw)
    elif not isinstance(raw, dict) or not _MATCHES[fmt](raw):
        what = f"keys {_keys(raw)}" if isinstance(raw, dict) else f"got {type_name(raw)}"
        raise BadRecord(f"record does not fit format '{fmt}': {what}")
    notes: list[str] = []
    outcome = None
    kept: dict = {}  # values a converter found deeper in the record, for its metadata
    if fmt == "webshop_session":
        messages, truth, reward, kept = convert_webshop_session(raw, notes)
    else:
        messages, truth = _CONVERTERS[fmt](raw, notes)
        outcome = outcome_key(raw)
        reward = None if outcome is None else as_outcome(outcome, raw[outcome])
    validate_messages(messages)
    truth, from_answer = _ground_truth(raw, truth, messages)
    tools = _record_tools(raw, default_tools, notes)
    unread = set() if len(raw) == 1 else raw.keys() - _READS[fmt]  # one field: the one detection saw
    unread -= {*_read_alternatives(fmt, raw), outcome, *(("answer",) if from_answer else ())}
    keys = unread | _partly_read(fmt, raw) | kept.keys()
    return Normalized(fmt, messages, truth if truth is None else check_unicode("ground truth", truth), reward,
                      tools, tuple(notes), _metadata({**raw, **kept}, keys) if keys else None)


# The input fields each format reads, for `metadata` (every other field is kept there): these, and the
# ones `_read_alternatives` names; the ground truth and the tool schemas (legacy `functions` beside
# `tools` is noted) in every format; the outcome field used, and `answer` when it is the ground truth.
_READS = {fmt: frozenset((*keys, "ground_truth", "tools", "functions")) for fmt, keys in {
    "messages": (),
    "sharegpt": ("system",),
    "prompt_completion": ("prompt",),
    "question_answer": ("answer",),
    "alpaca": ("instruction", "input", "output", "instances", "system", "history"),
    "hh": ("chosen", "prompt"),
    "transcript": ("problem",),
    "actions": ("action_history",),
    "webshop_session": ("pages", "session_id", "page", "url", "goal", "content", "reward"),
}.items()}


def _partly_read(fmt: str, raw: dict) -> set[str]:
    """Fields a format reads only part of, kept whole in `metadata`: a Self-Instruct task's `instances`
    when there are several (the first is the demonstration)."""
    instances = raw.get("instances") if fmt == "alpaca" and "output" not in raw else None
    return {"instances"} if isinstance(instances, list) and len(instances) > 1 else set()


def _read_alternatives(fmt: str, raw: dict) -> tuple[str, ...]:
    """Of a list of alternatives (`messages` / `conversations` ...) a format reads the first present; the
    others are kept in `metadata`."""
    if fmt == "messages":
        return (message_list_key(raw),)
    if fmt == "prompt_completion":
        return (first_key(raw, COMPLETION_KEYS) or "completion",)
    if fmt == "question_answer":
        return ("question",) if "question" in raw else ("problem", "solution")
    if fmt == "sharegpt":
        return (first_key(raw, CHAT_LIST_KEYS) or "conversations",)
    if fmt == "transcript":
        return (first_key(raw, TRANSCRIPT_KEYS) or "traj",)
    if fmt == "actions":
        return (first_key(raw, TASK_KEYS) or "problem",)
    return ()


def _metadata(raw: dict, keys: set) -> str | None:
    """The fields `keys` of the record as JSON text (keys sorted), None when none has a value. A null or
    NaN field is a missing one (pandas writes gaps as NaN), so it is not kept; a NaN inside a kept value
    becomes null. Values JSON cannot hold (Parquet timestamps, decimals, binary) are written as text: ISO
    8601, the decimal's digits, base64."""
    extra = {str(k): v for k in keys if (v := raw[k]) is not None and not (type(v) is float and v != v)}
    if not extra:
        return None
    value, dump = extra, functools.partial(json.dumps, sort_keys=True, separators=(",", ":"), default=_json_text)
    try:
        try:
            text = dump(value, ensure_ascii=False, allow_nan=False)
        except ValueError:  # a NaN inside (a missing value): null; an infinity stays JSON's "Infinity"
            value = _without_nan(extra)
            text = dump(value, ensure_ascii=False)
    except RecursionError:
        raise BadRecord(f"fields {_keys(extra)} are nested too deep to keep as metadata") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # an unpaired surrogate ("\ud800" in the input): kept as its JSON escape
            text = dump(value)
    return text


def _without_nan(value):
    if type(value) is float:
        return None if value != value else value
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def _json_text(value) -> str:
    """json.dumps `default` for values JSON has no type for."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return number_text(value) or "NaN"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def _record_tools(raw: dict, default: str | None, notes: list[str]) -> str | None:
    """The record's `tools`, else OpenAI's legacy `functions` (bare schemas), else --tools FILE."""
    if raw.get("tools") is not None:
        if raw.get("functions") is not None:
            notes.append("legacy 'functions' beside 'tools' not kept")
        return parse_tools(raw["tools"])
    if raw.get("functions") is not None:
        return parse_tools(raw["functions"], what="field 'functions'")
    return default


def _ground_truth(raw: dict, from_format: str | None, messages: list[dict]) -> tuple[str | None, bool]:
    """(ground truth, whether it is the `answer` field's). The same rules for every format, first match:
    1. an explicit `ground_truth` field;
    2. the format's own reference field (MATH's `answer`);
    3. a short `answer` field (at most MAX_ANSWER_CHARS; after its "####" if it has one), even when it
       is the reply itself ({question, answer: "Tokyo"});
    4. the final assistant turn's last line when it opens with "####" (GSM8K), whatever the format;
    5. the final assistant turn's last \\boxed{} (MATH), whatever the format.
    Numbers are written as `records.number_text` ("8", never "8.0")."""
    value = raw.get("ground_truth")
    if value is not None:  # the checks inline: this runs for every record
        explicit = as_ground_truth(value)
        if explicit is not None:
            return explicit, False
    if from_format is not None:
        return from_format, False
    value = raw.get("answer")
    if value is not None:
        answer = _short_answer(value)
        if answer is not None:
            return answer, True
    for m in reversed(messages):
        if m["role"] == "assistant":
            reply = m["content"]
            truth = hash_answer(reply, last_line_only=True) if "####" in reply else None
            if truth is None and "\\boxed{" in reply:
                truth = last_boxed(reply)
            return truth, False
    return None, False


def _short_answer(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        return None
    text = as_ground_truth(value)
    if text is None:
        return None
    text = text.strip()
    if len(text) > MAX_ANSWER_CHARS:
        return None
    return hash_answer(text, last_line_only=True) or text


def record_id(n: Normalized) -> str:
    """sha256 (32 hex chars) of the canonical JSON of messages (every field), ground truth, reward and
    tools (the key only when the record has tools, so ids of tool-free records stay as they were).

    The format and the source are left out on purpose: the same demonstration read from two files or
    two formats gets the same id, which is what deduplication keys on.
    """
    return hashlib.sha256(canonical_json(n).encode("utf-8")).hexdigest()[:32]


_ROLE_JSON = {role: _encode_str(role) for role in ROLES}  # encoded once: every message has one


def canonical_json(n: Normalized) -> str:
    """`json.dumps({"messages", "ground_truth", "reward"[, "tools"]}, sort_keys=True, ensure_ascii=False,
    separators=(",", ":"))`, assembled from json's own C string encoder: the same text, several times
    faster on the ingest hot path. Anything but {role, content} messages and a finite float reward
    takes the json.dumps route (the property tests check both agree). Tool calls, tool fields, reasoning
    and tools are all in the hash: two traces that differ only there are not duplicates."""
    enc, parts = _encode_str, []
    simple = n.tools is None and (n.ground_truth is None or type(n.ground_truth) is str) and (
        n.reward is None or (type(n.reward) is float and math.isfinite(n.reward)))
    for m in n.messages if simple else ():
        role, content = m.get("role"), m.get("content")
        if len(m) != 2 or type(role) is not str or type(content) is not str:
            simple = False
            break
        parts.append(f'{{"content":{enc(content)},"role":{_ROLE_JSON.get(role) or enc(role)}}}')
    if not simple:
        body = {"messages": n.messages, "ground_truth": n.ground_truth, "reward": n.reward}
        if n.tools is not None:
            body["tools"] = n.tools
        return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    truth = "null" if n.ground_truth is None else enc(n.ground_truth)
    reward = "null" if n.reward is None else float.__repr__(n.reward)
    return f'{{"ground_truth":{truth},"messages":[{",".join(parts)}],"reward":{reward}}}'


def _attempt(raw: dict, fmt: str, tools: str | None = None) -> Normalized | BadRecord:
    """Any failure on one record is that record's quarantine reason ("ExcType: message" when it is not a
    BadRecord): a record never stops the run."""
    try:
        return normalize(raw, fmt, tools)
    except BadRecord as e:
        return e
    except RecursionError as e:
        return BadRecord(f"RecursionError: record nested too deep to read ({e})")
    except Exception as e:
        return BadRecord(f"{type(e).__name__}: {e}")


def is_session_line(item: dict | RawError, fmt: str) -> bool:
    """A WebShop page visit: grouped with the lines around it that share its session."""
    if fmt not in ("auto", "webshop_session") or not isinstance(item, dict) or not is_page_visit(item):
        return False
    return fmt == "webshop_session" or detect_format(item) == "webshop_session"


def iter_normalized(
    path: str | os.PathLike, items: Iterable[tuple[int, dict | RawError]], fmt: str = "auto",
    tools: str | None = None,
) -> Iterator[tuple[int, dict | str, Normalized | BadRecord]]:
    """Normalise one file's records: yields (source_index, raw dict or raw text, Normalized or BadRecord).

    `items` is `read_records(path)`. Unparseable lines come through as BadRecord with the reader's
    reason and their raw text. WebShop page-visit lines are grouped (consecutive lines of one session
    id, `path` standing in when a URL has none) into one record per session, whose source_index is
    its first line and whose raw dict is {"session_id", "pages"}. Output is in source_index order.
    `tools`: the default `tools` of records without their own (--tools FILE, canonical JSON text).
    """
    if fmt != "auto" and fmt not in FORMATS:  # a usage error, not a bad record
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    pending: list[tuple[int, dict]] = []
    for index, item in items:
        if is_session_line(item, fmt):
            pending.append((index, item))
            continue
        if pending:
            yield from _sessions(pending, path)
            pending = []
        if isinstance(item, RawError):
            yield index, item.raw, BadRecord(item.reason)
        else:
            yield index, item, _attempt(item, fmt, tools)
    yield from _sessions(pending, path)


def _sessions(
    visits: list[tuple[int, dict]], path: str | os.PathLike
) -> Iterator[tuple[int, dict, Normalized | BadRecord]]:
    for start, session in group_sessions(visits, str(path)):
        yield start, session, _attempt(session, "webshop_session")
