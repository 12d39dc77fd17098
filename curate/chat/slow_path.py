"""The slow path of `curate.chat.spans.Layout`: a turn's span found in the full rendered text itself
(module doc of curate.chat, steps 1-3), with the reply header and tail the template writes around it.

A mixin of `Layout`, in a module of its own because it is the larger half of the rules: `Layout` keeps
rendering, the fast path and the stand-ins that both paths use. The methods here read `Layout`'s state
(`text`, `m`, `origin`, `shared`, `tokenizer`) and call its `render`, `prefix`, `name` and stand-in methods.
"""

from __future__ import annotations

from curate.chat.templates import TemplateError
from curate.chat.text_diff import _common_end, _common_prefix, _insertions

# Placeholder text, call name and call arguments of the stand-ins that replace a turn while it is
# located (slow path). Their first and last characters differ, so when the turn's own text happens to
# begin or end like the first, the second still differs there.
_STAND_INS = (("Qx", "qx", {"q": "x"}), ("Zy", "zy", {"z": 7}))

_USER = {"role": "user", "content": "What is the weather in Paris?"}  # a turn to render a reply after
_FOLLOW_USER = {"role": "user", "content": "Wv"}  # follows a turn to render it as not the last one


class _SlowPath:
    """Slow-path methods of `Layout` (see the module doc)."""

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
        """The tokenizer's special and added token ids (cached in `shared`): a clean cut may fall on either side
        of one."""
        if "special_ids" not in self.shared:
            self.shared["special_ids"] = {*self.tokenizer.all_special_ids,
                                           *getattr(self.tokenizer, "added_tokens_decoder", {})}
        return self.shared["special_ids"]

