"""Where each assistant turn is in the rendered text (see curate.chat's module doc: fast and slow path,
and windows: `locate`)."""

from __future__ import annotations

import bisect

from curate.chat.anchors import _anchor_marks, _anchors
from curate.chat.slow_path import _STAND_INS, _SlowPath
from curate.chat.templates import TemplateError, render_template
from curate.chat.text_diff import _common_prefix, _common_suffix

# The slow path (curate.chat.slow_path), the string comparisons (curate.chat.text_diff) and the window
# anchors (curate.chat.anchors) are in their own modules; rendering stays here, in `Layout.render`.


class Layout(_SlowPath):
    """Finds the span of every assistant turn in the rendered text (module doc: fast and slow path)."""

    def __init__(self, tokenizer, template: str, tools, messages: list[dict], origin: list,
                 shared: dict | None = None):
        self.tokenizer, self.template, self.tools, self.m, self.origin = tokenizer, template, tools, messages, origin
        self._prefixes: dict[tuple[int, bool], str] = {}
        # what depends only on the template and tools (the user piece, special ids, the header of a
        # first reply): shared by the layouts of one record's windows
        self.shared = shared if shared is not None else {}
        self._diffs: dict[tuple[int, int], tuple[int, int] | None] = {}
        self._lasts: dict[tuple[int, int], str] = {}
        self.text = self.prefix(len(messages))

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """`messages` (template form) rendered with this layout's template and tools; TemplateError when the
        template refuses them."""
        return render_template(self.tokenizer, self.template, messages, self.tools, generation_prompt)

    def prefix(self, k: int, generation_prompt: bool = False) -> str:
        """Rendering of messages[:k] (cached: the fast path and the slow path share them)."""
        if (k, generation_prompt) not in self._prefixes:
            self._prefixes[k, generation_prompt] = self.render(self.m[:k], generation_prompt)
        return self._prefixes[k, generation_prompt]

    def name(self, i: int) -> str:
        """How errors name message i: "assistant turn N", N its index in the record's messages (`origin`)."""
        return f"assistant turn {self.origin[i]}"

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of every assistant turn in `text`, in order, each after the one before."""
        spans, cursor = [], 0
        for i, msg in enumerate(self.m):
            if msg["role"] != "assistant":
                continue
            spans.append(self.span(i, cursor))
            cursor = spans[-1][1]
        return spans

    def span(self, i: int, cursor: int) -> tuple[int, int]:
        """[start, end) of assistant turn i in `text`, at or after `cursor` (where the turn before ends)."""
        span = self._by_prefixes(i, cursor)
        if span is None:
            span = self._in_context(i, cursor)
        elif not self._shows_own_text(i, span):
            raise TemplateError(f"chat template: {self.name(i)} renders no tokens")
        return span

    def _by_prefixes(self, i: int, cursor: int) -> tuple[int, int] | None:
        """Fast path: the span between the generation prompt after messages[:i] and the rendering of
        messages[:i+1] (stripped), when both are prefixes of the full text. None when they are not."""
        if i == 0:  # nothing to render before the turn (transformers refuses an empty conversation)
            return None
        head, upto = self.prefix(i, True), self.prefix(i + 1)
        if not (self.text.startswith(head) and self.text.startswith(upto) and len(head) < len(upto)):
            return None
        start, end = len(head), len(upto.rstrip())
        return (start, end) if cursor <= start < end else None

    def _shows_own_text(self, i: int, span: tuple[int, int]) -> bool:
        """Whether anything of turn i itself (not only template text) is in the rendered text: its content
        inside its span (cheap), else the exact test: a stand-in of the turn changes the text."""
        content = self.m[i].get("content")
        if isinstance(content, str) and content.strip() and content.strip() in self.text[span[0]:span[1]]:
            return True
        return any(self._difference(i, k) for k in range(len(_STAND_INS))) or self._renders_call_names(i)

    def _renders_call_names(self, i: int) -> bool:
        """Whether the text changes with turn i's call names (a template that writes names, not arguments)."""
        return bool(self.m[i].get("tool_calls")) and any(
            self.render(self.m[:i] + [self._stand_in(i, k, names=True)] + self.m[i + 1:]) != self.text
            for k in range(len(_STAND_INS)))

    def _stand_in(self, i: int, k: int, names: bool = False) -> dict:
        """Turn i with its content, reasoning and call arguments replaced by stand-in k's placeholders;
        empty fields stay empty and nothing is added, so the template takes the same branches. Call
        names are kept unless `names`: other turns may repeat them (Gemma 4 writes the call's name
        into the tool response), and what changes must stay inside turn i."""
        text, call_name, call_args = _STAND_INS[k]
        out = dict(self.m[i])
        for key in ("content", "reasoning_content"):
            if isinstance(out.get(key), str) and out[key]:
                out[key] = text
        if out.get("tool_calls"):
            calls = []
            for c in out["tool_calls"]:
                fn = dict(c["function"])
                fn["arguments"] = call_args if isinstance(fn.get("arguments"), dict) else call_name
                if names:
                    fn["name"] = call_name
                calls.append({**c, "function": fn})
            out["tool_calls"] = calls
        return out

    def _difference(self, i: int, k: int) -> tuple[int, int] | None:
        """(u, v): where the full text first and last differs from it with turn i replaced by stand-in
        k (common suffix taken after the common prefix). None: no difference."""
        if (i, k) not in self._diffs:
            other = self.render(self.m[:i] + [self._stand_in(i, k)] + self.m[i + 1:])
            u = _common_prefix(self.text, other)
            v = len(self.text) - _common_suffix(self.text, other, u)
            self._diffs[i, k] = None if other == self.text else (u, v)
        return self._diffs[i, k]

    def _last_stand_in(self, i: int, k: int) -> str:
        """Rendering of messages[:i] followed by stand-in k of turn i (header and tail share it)."""
        if (i, k) not in self._lasts:
            self._lasts[i, k] = self.render(self.m[:i] + [self._stand_in(i, k)])
        return self._lasts[i, k]


# ---------------------------------------------------------------------------------------- windows

# Conversations of at least WINDOW_FROM messages are located by windows (`locate`); shorter ones whole.
WINDOW_FROM = 32
# The turns located in one window lie within BLOCK messages of each other.
BLOCK = 12
# How far before a block's first turn a window may start (more: the turns are located in the whole).
REACH = 48


def locate(tokenizer, template: str, tools, messages: list[dict], origin: list
           ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the span of every assistant turn (what `Layout.spans` gives), in
    time linear in the number of turns.

    `Layout` renders the conversation up to each turn (and, on its slow path, the whole conversation
    with the turn replaced): a long record costs its number of turns times renders of its length,
    quadratic in its turns. Here the full text is rendered once, and the turns are located a few
    consecutive ones at a time (BLOCK messages at most) in a window of the record, by the same rules
    (`Layout.span`), then shifted into the full text:

    * the window is a head, the record's first messages, followed by the messages around the turns.
      The head holds every message before the first reply (system turn, schemas, first query: what
      templates treat apart) and the first message of each role the window holds (DeepSeek opens only
      the record's first tool output with a marker), and ends with a message of the role of the one
      before the window's own first message, an even number of messages before it (roles alternate
      as in the record: Gemma refuses two user turns in a row). The window's own messages run from the
      turn before the block (or an earlier message, at most REACH before) to the second message after
      the turn that follows the block (every message between the turns is there, and none of them is
      rendered last), or past the next user turn when that does not hold (Qwen3 writes a turn's
      reasoning only when no query follows it). The first turns, or turns with no such head, get a
      prefix of the record as their window;
    * anchors place the window in the full text: every message is rendered with a mark (its index
      between two letter pairs the text does not hold) inserted in the middle of its content (after a
      `</think>`, as templates drop what comes before), in the full conversation (once) and in the
      window. A mark found once, the text with its marks removed being exactly the unmarked text, is
      where that message's content is in either text;
    * the window's text, from the anchor of its first anchored message up to the turn before the block
      (from the start, for a prefix) to that of the first anchored message after the block (the end,
      when the window reaches the record's), must be exactly that stretch of the full text, and each
      span must lie inside it.

    When any of this fails (the template renders a turn by what is far from it, a mark does not show
    as it is, the template refuses the window) the block's turns are located in the whole
    conversation, as `Layout.spans` does. Where the template renders each turn from its neighbourhood
    the spans are those the whole conversation gives (checked on the templates TRL ships, tools and
    reasoning included: tests/test_encoding_integrity.py)."""
    full = Layout(tokenizer, template, tools, messages, origin)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(messages) < WINDOW_FROM or not turns:
        return full.text, full.spans()
    windows = _Windows(full, turns)
    spans, cursor, k = [], 0, 0
    while k < len(turns):
        j = k
        while j + 1 < len(turns) and turns[j + 1] - turns[k] < BLOCK:
            j += 1
        got = windows.block(k, j, cursor)
        if got is None:
            got = []
            for i in turns[k:j + 1]:
                got.append(full.span(i, cursor))
                cursor = got[-1][1]
        spans += got
        cursor = spans[-1][1]
        k = j + 1
    return full.text, spans


class _Windows:
    """Locates blocks of consecutive turns of one conversation in windows of it (`locate`)."""

    def __init__(self, full: Layout, turns: list[int]):
        self.full, self.turns, self.m = full, turns, full.m
        self.roles = [m["role"] for m in self.m]
        self.refused: dict[str, int] = {}  # why blocks were located in the whole conversation, and how often
        self._final = False  # the last window failed so that a longer one would fail too
        self.marks = _anchor_marks(full.text)
        self.anchors = _anchors(full.render, self.m, range(len(self.m)), full.text, self.marks) if self.marks else None
        # where each role first appears, and the heads a window can have after a message of each role
        # (by the parity of their length): what the head must end with
        self._first: dict[str, int] = {}
        self._heads: dict[tuple[str, int], list[int]] = {}
        for x, role in enumerate(self.roles):
            self._first.setdefault(role, x)
            self._heads.setdefault((role, (x + 1) % 2), []).append(x + 1)
        # the first user turn at or after each message (len: none)
        self._next_user = [len(self.m)] * (len(self.m) + 1)
        for x in range(len(self.m) - 1, -1, -1):
            self._next_user[x] = x if self.roles[x] == "user" else self._next_user[x + 1]

    def _refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        return None

    def block(self, k: int, j: int, cursor: int) -> list[tuple[int, int]] | None:
        """The spans of turns[k..j] (in the full text), the turn before ending at `cursor`; None when
        no window holds (`locate`). The window ends at the second message after the next turn; when
        that does not hold, after the next user turn (a template may render a turn by whether a later
        query exists: Qwen3 drops the reasoning of turns before the last one)."""
        if self.anchors is None:
            return self._refuse("no anchors")
        n, last = len(self.m), self.turns[j]
        after = self.turns[j + 1] if j + 1 < len(self.turns) else None
        ends = [n if after is None else min(n, after + 2)]
        query = self._next_user[max(ends[0] - 1, last + 1)]
        if query < n and query + 2 > ends[0]:
            ends.append(min(n, query + 2))
        for end in ends:
            while end < n and not any(x in self.anchors for x in range(last + 1, end)):
                end += 1
            got = self._window(k, j, cursor, end)
            if got is not None or self._final:
                return got
        return None

    def _window(self, k: int, j: int, cursor: int, end: int) -> list[tuple[int, int]] | None:
        """turns[k..j] located in the window that ends at message `end` (`block`)."""
        m, anchors, n = self.m, self.anchors, len(self.m)
        self._final = False
        last, before = self.turns[j], self.turns[k - 1] if k else None
        head = start = 0  # a prefix of the record
        if before is not None:
            # the head holds every message before the first reply, and the first message of each role
            # in the window (DeepSeek opens only the record's first tool output with its own marker)
            least = max([1, self.turns[0], *(self._first[r] + 1 for r in set(self.roles[before:end]))])
            for a in range(before, max(before - REACH, least) - 1, -1):
                heads = self._heads.get((self.roles[a - 1], a % 2), [])
                at = bisect.bisect_left(heads, least)
                h = heads[at] if at < len(heads) and heads[at] <= a else None
                if h is not None and any(x in anchors for x in range(a, before + 1)):
                    head, start = h, a
                    break
            # else: no such start near enough (a role first seen in the block): a prefix of the record
            if head == start:
                head = start = 0
        if head == start and end == n:
            self._final = True
            return self._refuse("whole")  # the whole record: nothing to gain
        ids = [*range(head), *range(start, end)]
        sub = [m[x] for x in ids]
        try:
            window = Layout(self.full.tokenizer, self.full.template, self.full.tools, sub,
                            [self.full.origin[x] for x in ids], self.full.shared)
            if self.marks[0] in window.text:
                return self._refuse("mark in window")
            marks = _anchors(window.render, m, ids, window.text, self.marks)
        except TemplateError:
            return self._refuse("refused")
        if marks is None:
            return self._refuse("window anchors")
        # the stretch of the window that must be the full text's
        if start == 0:
            lo = lo_full = 0
        else:
            x = next((x for x in range(start, before + 1) if x in anchors and x in marks), None)
            if x is None:
                return self._refuse("no start anchor")
            lo, lo_full = marks[x], anchors[x]
        if end == n:
            hi, hi_full = len(window.text), len(self.full.text)
        else:  # up to the next message after the block (the window's last ones may render as last)
            x = next((x for x in range(last + 1, end) if x in anchors and x in marks), None)
            if x is None:
                return self._refuse("no end anchor")
            hi, hi_full = marks[x], anchors[x]
        if hi - lo != hi_full - lo_full or window.text[lo:hi] != self.full.text[lo_full:hi_full]:
            return self._refuse("differs")
        shift, out = lo_full - lo, []
        for i in self.turns[k:j + 1]:
            if cursor - shift < lo:
                return self._refuse("cursor")
            try:
                s, e = window.span(i - start + head, cursor - shift)
            except TemplateError:  # said again, or not, by the whole conversation
                return self._refuse("turn refused")
            if s < lo or e > hi:
                return self._refuse("outside")
            out.append((s + shift, e + shift))
            cursor = e + shift
        return out

