"""Anchors for the windows of `curate.chat.spans.locate`: a mark (a message's index between two letter
pairs) inserted mid-content in each message, and where each mark is found in a rendering.

Separate from the window logic in curate.chat.spans: they only mark messages and read the marks back
from rendered text, with no notion of turns or spans.
"""

from __future__ import annotations

import re

from curate.chat.templates import TemplateError

# Anchors: the message's index between these, inserted in its content. Each pair is tried in turn
# until one whose left part the rendered text does not contain.
_ANCHOR_MARKS = (("Zq", "Kx"), ("Wj", "Vq"), ("Xk", "Jz"), ("Qv", "Yw"))


def _anchor_marks(text: str) -> tuple[str, str] | None:
    """The first mark pair (`_ANCHOR_MARKS`) whose left part `text` does not contain."""
    return next(((a, b) for a, b in _ANCHOR_MARKS if a not in text), None)


def _anchor_at(content) -> int | None:
    """Where a message's anchor goes in its content: the middle of its text after the last `</think>`
    (templates drop what comes before), leading and trailing whitespace left out, so that it keeps how
    it starts and ends; None for content with fewer than two characters there (or not a string)."""
    if not isinstance(content, str):
        return None
    think = content.rfind("</think>")
    lo = think + len("</think>") if think >= 0 else 0
    lo += len(content[lo:]) - len(content[lo:].lstrip())
    hi = len(content.rstrip())
    return (lo + hi) // 2 if hi - lo >= 2 else None


def _anchors(render, messages: list[dict], ids, text: str, marks: tuple[str, str]) -> dict[int, int] | None:
    """{message index: where its anchor is in `text`} for the messages `ids` (indices into `messages`)
    rendered (by `render`) with their anchors, for each anchor found exactly once; None when the
    marked rendering, its marks removed, is not `text` (the template changed something else)."""
    left, right = marks
    out = []
    for x in ids:
        msg = messages[x]
        at = _anchor_at(msg.get("content"))
        if at is not None:
            msg = {**msg, "content": f"{msg['content'][:at]}{left}{x}{right}{msg['content'][at:]}"}
        out.append(msg)
    try:
        marked = render(out)
    except TemplateError:
        return None
    found: dict[int, list[int]] = {}
    pieces, removed, prev = [], 0, 0
    for hit in re.finditer(re.escape(left) + r"(\d+)" + re.escape(right), marked):
        pieces.append(marked[prev:hit.start()])
        found.setdefault(int(hit.group(1)), []).append(hit.start() - removed)
        removed += hit.end() - hit.start()
        prev = hit.end()
    pieces.append(marked[prev:])
    if "".join(pieces) != text:
        return None
    return {x: at[0] for x, at in found.items() if len(at) == 1}
