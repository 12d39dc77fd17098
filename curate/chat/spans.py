"""Where each assistant turn is in the rendered text (see curate.chat's module doc: fast and slow path,
and windows: `locate`)."""

from __future__ import annotations

import bisect
import re

from curate.chat.templates import TemplateError, render_template

# Placeholder text, call name and call arguments of the stand-ins that replace a turn while it is
# located (slow path). Their first and last characters differ, so when the turn's own text happens to
# begin or end like the first, the second still differs there.
_STAND_INS = (("Qx", "qx", {"q": "x"}), ("Zy", "zy", {"z": 7}))

_USER = {"role": "user", "content": "What is the weather in Paris?"}  # a turn to render a reply after
_FOLLOW_USER = {"role": "user", "content": "Wv"}  # follows a turn to render it as not the last one


class Layout:
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
        return render_template(self.tokenizer, self.template, messages, self.tools, generation_prompt)

    def prefix(self, k: int, generation_prompt: bool = False) -> str:
        """Rendering of messages[:k] (cached: the fast path and the slow path share them)."""
        if (k, generation_prompt) not in self._prefixes:
            self._prefixes[k, generation_prompt] = self.render(self.m[:k], generation_prompt)
        return self._prefixes[k, generation_prompt]

    def name(self, i: int) -> str:
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

    def _in_context(self, i: int, cursor: int) -> tuple[int, int]:
        """Slow path: the span of turn i found in the full text itself (module doc, steps 1-3). Stand-in 1
        is rendered only when stand-in 0 tells nothing (the turn's text is the placeholder) or its end
        is not found."""
        failure = None
        for k in range(len(_STAND_INS)):
            diff = self._difference(i, k)
            if diff is None:
                continue
            u, v = diff
            start = self._start(i, cursor, u)
            self._check_alone(i, (start, v))
            try:
                return start, v + self._tail_at(i, k, v)
            except TemplateError as e:
                failure = e
        if failure is not None:
            raise failure
        if self._renders_call_names(i):
            raise TemplateError(f"chat template: {self.name(i)} cannot be located in the rendered text "
                                "(only its call names show)")
        raise TemplateError(f"chat template: {self.name(i)} renders no tokens")

    def _check_alone(self, i: int, span: tuple[int, int]) -> None:
        """Slow path: no other message's text inside the span. Some templates write the tool results that
        follow a call inside the calling turn, before its content (Gemma 4): such a turn is not one
        span, and masking it would train on the results. Every message between the assistant turns
        before and after gets a placeholder inserted mid-content (an empty one gets just the
        placeholder), which keeps how it starts and ends (Qwen3 reads `<tool_response>` there); where
        the text changes is then inside that message. One rendering marks them all; when the
        placeholders do not show verbatim (a template that escapes text), one rendering each."""
        roles = [m["role"] for m in self.m]
        lo = max((j for j in range(i) if roles[j] == "assistant"), default=-1) + 1
        hi = next((j for j in range(i + 1, len(roles)) if roles[j] == "assistant"), len(roles))
        near = [j for j in range(lo, hi) if j != i and isinstance(self.m[j].get("content"), str)]
        if not near:
            return
        mark = _STAND_INS[0][0]

        def marked(js):
            out = list(self.m)
            for j in js:
                content = out[j]["content"]
                out[j] = {**out[j], "content": content[:len(content) // 2] + mark + content[len(content) // 2:]}
            return self.render(out)

        places = _insertions(self.text, marked(near), mark, len(near))
        if places is None:
            places = [_common_prefix(self.text, marked([j])) for j in near]
        for j, at in zip(near, places):
            if span[0] < at < span[1]:
                raise TemplateError(f"chat template: {self.name(i)} is not one piece of the rendered text: "
                                    f"the template writes message {self.origin[j]} inside it")

    def _start(self, i: int, cursor: int, u: int) -> int:
        """Where turn i's span starts: right after the last occurrence of the reply header (`_header`)
        in text[cursor:u], its longest clean form first. Without a header, or when only the generation
        prompt could stand for it and it is not there: where the text of messages[:i] stops matching
        the full text (or, when that is earlier, where its end is found: `_prefix_end`), when that is
        between the turn before and u; else at u, where the turn's own text begins."""
        header, sure = self._header(i)
        for form in self._cut_forms(header, strip=False) if header else []:
            at = self.text.rfind(form, cursor, u)
            if at >= 0:
                return at + len(form)
        if header and sure:
            raise TemplateError(f"chat template: {self.name(i)} does not appear in the rendered text "
                                f"(its header {header!r} is missing)")
        if i:  # where the text of messages[:i] stops matching (DeepSeek-V3 writes a call after tool output bare)
            at = _common_prefix(self.text, self.prefix(i))
            if at < len(self.prefix(i)):  # or it rendered differently before (Mistral: schemas at the last query)
                at = max((a for a in (at, self._prefix_end(i, cursor, u)) if a is not None and cursor <= a <= u),
                         default=-1)
            if cursor <= at <= u:
                return at
        if u < cursor:
            raise TemplateError(f"chat template: {self.name(i)} does not appear after the turn before it")
        return u

    def _prefix_end(self, i: int, cursor: int, u: int) -> int | None:
        """Where the text of messages[:i] ends in text[cursor:u] when it does not match the full text
        from the start (Mistral writes the schemas before the last user turn, which moves once a later
        one exists): after the last occurrence there of its end from message i-1's own text on. None
        when message i-1 has no text that shows as it is."""
        prefix, content = self.prefix(i), self.m[i - 1].get("content")
        if not (isinstance(content, str) and content.strip()):
            return None
        at = prefix.rfind(content.strip())
        if at < 0:
            return None
        found = self.text.rfind(prefix[at:], cursor, u)
        return found + len(prefix) - at if found >= 0 else None

    def _header(self, i: int) -> tuple[str, bool]:
        """What the template writes before a reply, and whether a rendered reply showed it.

        The generation prompt after messages[:i], up to where a reply rendered after messages[:i]
        departs from it (DeepSeek-R1's prompt ends in `<think>\\n`, which its replies do not have), cut
        back to a clean place when there is one (no half tag). When the reply changes the text before
        the prompt (GPT-OSS renders a last tool result apart), the whole prompt, not sure. For turn 0,
        taken after a user turn."""
        if i:
            prompt, bare, reply = self.prefix(i, True), self.prefix(i), self._last_stand_in(i, 0)
        else:
            context = [_USER]
            try:
                if "first" not in self.shared:
                    self.shared["first"] = self.render(context, True), self.render(context)
                prompt, bare = self.shared["first"]
                reply = self.render(context + [self._stand_in(i, 0)])
            except TemplateError:
                return "", False
        base = _common_prefix(prompt, bare)
        end = _common_prefix(prompt, reply)
        if end <= base:
            return prompt[base:], False
        if end < len(prompt):
            clean = max((c for c in self._cuts(prompt[base:], strip=False) if c <= end - base), default=0)
            end = base + clean if clean else end
        return prompt[base:end], True

    def _tail_at(self, i: int, k: int, v: int) -> int:
        """Length of what the template writes after turn i's own text, found at v in the full text.

        First as the turn ends when it is the last message: the common end of turn i and stand-in k
        rendered last, or its longest cut at a whitespace or special-token boundary (the last message
        may get more, e.g. an end-of-text). Else as the turn ends when a user turn follows (GPT-OSS
        ends the last reply with <|return|>, the others with <|end|>): the same common end, rendered
        with a user turn after both and that user turn's text taken off."""
        tail = _common_end(self.prefix(i + 1).rstrip(), self._last_stand_in(i, k).rstrip())
        for form in self._cut_forms(tail, strip=True) if tail else [""]:
            if self.text.startswith(form, v):
                return len(form)
        piece = self._user_piece()
        if piece:
            followed = self.render(self.m[:i + 1] + [_FOLLOW_USER])
            stand_in = self.render(self.m[:i] + [self._stand_in(i, k), _FOLLOW_USER])
            if followed.endswith(piece) and stand_in.endswith(piece):
                tail = _common_end(followed[:-len(piece)].rstrip(), stand_in[:-len(piece)].rstrip())
                if self.text.startswith(tail, v):
                    return len(tail)
        raise TemplateError(f"chat template: cannot find where {self.name(i)} ends in the rendered text")

    def _user_piece(self) -> str:
        """What the template writes for a user turn at the end of a chat: the rendering of [user, user]
        past that of [user] ("" when the template refuses two user turns or rewrites the first)."""
        if "piece" not in self.shared:
            first = [_USER]
            try:
                one, two = self.render(first), self.render(first + [_FOLLOW_USER])
            except TemplateError:
                one, two = "", ""
            self.shared["piece"] = two[len(one):] if one and two.startswith(one) else ""
        return self.shared["piece"]

    def _cuts(self, text: str, strip: bool) -> list[int]:
        """Clean places to cut `text`, last first: its end, the edges of special tokens (`<|im_end|>`) and
        the ends of whitespace runs; with `strip` (an end of turn, whose trailing whitespace goes) also
        their starts, without it (a header) also between two tags (`><`, `][`: markers the tokenizer
        does not know as special tokens). Never inside a word or a token such as `<|im_start|>`."""
        cuts = {len(text)}
        for j in range(1, len(text)):
            before, after = text[j - 1].isspace(), text[j].isspace()
            if (before and not after) or (strip and after and not before):
                cuts.add(j)
            elif not strip and text[j - 1] in ">]" and text[j] in "<[":  # between two tags: `<｜Assistant｜><`
                cuts.add(j)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if token in self.special_ids:
                cuts.update((a, b))
        return sorted(cuts, reverse=True)

    def _cut_forms(self, text: str, strip: bool) -> list[str]:
        """`text` and its prefixes that end at a clean cut (`_cuts`), longest first; with `strip`,
        trailing whitespace dropped."""
        forms = []
        for b in self._cuts(text, strip):
            form = text[:b].rstrip() if strip else text[:b]
            if form and form not in forms:
                forms.append(form)
        return forms

    @property
    def special_ids(self) -> set[int]:
        if "special_ids" not in self.shared:
            self.shared["special_ids"] = {*self.tokenizer.all_special_ids,
                                           *getattr(self.tokenizer, "added_tokens_decoder", {})}
        return self.shared["special_ids"]


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (bisection on slices: C-speed compares on long texts)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix(a: str, b: str, floor: int = 0) -> int:
    """Length of the common suffix of a[floor:] and b[floor:]."""
    return _common_prefix(a[floor:][::-1], b[floor:][::-1])


def _insertions(text: str, marked: str, mark: str, n: int) -> list[int] | None:
    """Where `marked` is `text` with `mark` inserted n times: the n places in `text`, in order; None when
    it is not (the template changed something else, or escaped the mark)."""
    places, a, b = [], 0, 0
    for _ in range(n):
        p = _common_prefix(text[a:], marked[b:])
        a, b = a + p, b + p
        if not marked.startswith(mark, b):
            return None
        places.append(a)
        b += len(mark)
    return places if text[a:] == marked[b:] else None


def _common_end(a: str, b: str) -> str:
    """The common suffix of a and b that does not reach into their common prefix."""
    n = _common_suffix(a, b, _common_prefix(a, b))
    return a[len(a) - n:] if n else ""


# ---------------------------------------------------------------------------------------- windows

# Conversations of at least WINDOW_FROM messages are located by windows (`locate`); shorter ones whole.
WINDOW_FROM = 32
# The turns located in one window lie within BLOCK messages of each other.
BLOCK = 12
# How far before a block's first turn a window may start (more: the turns are located in the whole).
REACH = 48
# Anchors: the message's index between these, inserted in its content. Each pair is tried in turn
# until one whose left part the rendered text does not contain.
_ANCHOR_MARKS = (("Zq", "Kx"), ("Wj", "Vq"), ("Xk", "Jz"), ("Qv", "Yw"))


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
