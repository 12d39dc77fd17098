"""Raw input records -> canonical conversations (`Normalized`), one format adapter per input style.

The ingest stage calls one function per file, `iter_normalized`, on what `curate.io.readers.read_records`
yielded. Formats are detected per record, first match in `FORMATS` order; each one's detection rule is
the predicate in `_MATCHES`, its conversion a `convert_*` function in conversations.py, agents.py or webshop.py.
Everything a format does not decide (recorded outcome, `ground_truth` field, final validation) is done
once here, so all formats agree on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from json.encoder import encode_basestring as _encode_str  # the C encoder json.dumps uses (ensure_ascii=False)
from collections.abc import Callable, Iterable, Iterator

from curate.formats.agents import TRANSCRIPT_KEYS, convert_actions, convert_transcript
from curate.formats.conversations import (
    COMPLETION_KEYS,
    MESSAGE_LIST_KEYS,
    Converted,
    convert_alpaca,
    convert_hh,
    convert_messages,
    convert_prompt_completion,
    convert_question_answer,
    convert_sharegpt,
)
from curate.formats.records import (
    ROLES,
    BadRecord,
    Normalized,
    as_ground_truth,
    check_unicode,
    recorded_reward,
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
    if fmt == "webshop_session":
        messages, truth, reward = convert_webshop_session(raw)
    else:
        (messages, truth), reward = _CONVERTERS[fmt](raw, notes), recorded_reward(raw)
    validate_messages(messages)
    truth = _ground_truth(raw, truth, messages)
    tools = _record_tools(raw, default_tools, notes)
    return Normalized(fmt, messages, truth if truth is None else check_unicode("ground truth", truth), reward,
                      tools, tuple(notes))


def _record_tools(raw: dict, default: str | None, notes: list[str]) -> str | None:
    """The record's `tools`, else OpenAI's legacy `functions` (bare schemas), else --tools FILE."""
    if raw.get("tools") is not None:
        if raw.get("functions") is not None:
            notes.append("legacy 'functions' beside 'tools' not kept")
        return parse_tools(raw["tools"])
    if raw.get("functions") is not None:
        return parse_tools(raw["functions"], what="field 'functions'")
    return default


def _ground_truth(raw: dict, from_format: str | None, messages: list[dict]) -> str | None:
    """An explicit `ground_truth` field wins; then the format's own rule; then a short `answer`."""
    explicit = as_ground_truth(raw.get("ground_truth"))
    if explicit is not None or from_format is not None:
        return explicit if explicit is not None else from_format
    answer = raw.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return None
    answer = str(answer).strip()
    replies = {m["content"].strip() for m in messages if m["role"] == "assistant"}
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS and answer not in replies else None


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
    try:
        return normalize(raw, fmt, tools)
    except BadRecord as e:
        return e


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
