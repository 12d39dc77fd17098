"""Chat-template encoding with an assistant-only loss mask.

`encode` renders a conversation with the model's own chat template (its `tools` and the messages' tool
fields included), tokenises the text once and sets the loss mask on the tokens of every assistant turn:
what the template writes for the turn after its generation prompt (content, reasoning and tool calls as
rendered, and the end-of-turn token), never the turn header, user, system or tool turns. The generation
prompt is what the model is given at inference, so text a template puts in it (a `<think>\n` prefill)
is not a target.

Templates rarely mark where assistant text starts and ends, so we find it by rendering.

* Fast path (templates that do not rewrite history: most of them). The text of messages[:i] with the
  generation prompt is where assistant turn i starts, the text of messages[:i+1] is where it ends (its
  end-of-turn token included, trailing whitespace not). Both must be prefixes of the full text.
* Slow path (templates that render a turn differently once later messages exist: Qwen3, QwQ and
  DeepSeek-R1 drop the reasoning of turns before the last user query, Qwen3 gives only the last turn
  an empty <think></think>, GPT-OSS ends only the last reply with <|return|>). The turn is found in the
  full text itself, in its real context:
  1. its own text: the full conversation is rendered again with turn i replaced by a stand-in of the
     same shape (content, reasoning and call arguments swapped for a short placeholder; nothing added
     or removed, so the template takes the same branches; call names kept, as tool results may repeat
     them). Where that text first (u) and last (v) differs from the full one bounds what turn i
     writes of its own. A second stand-in is used when the first tells nothing or fails.
  2. its start: the header the template writes before a reply, i.e. the generation prompt after
     messages[:i] up to where a reply rendered there departs from it (DeepSeek-R1's prompt ends in
     `<think>\n`, its replies do not), cut at a clean place (whitespace, special token, between two
     tags). Its last occurrence between the previous turn and u; the span starts right after it.
     When the template writes no header there (DeepSeek after tool output) the span starts where the
     text of messages[:i] stops matching, else at u.
  3. its end: what the template writes after a reply (the common end of the turn and its stand-in
     rendered as the last message, e.g. `<|im_end|>`, or its longest clean cut when the last message
     gets more, e.g. an end-of-text; else the same rendered with a user turn after it) must follow v
     in the full text exactly.
  4. alone: no other message's text may fall inside the span (Gemma 4 writes the results of a call
     inside the calling turn, before its content: such a turn is not one piece and is refused).
  A turn that cannot be found this way raises TemplateError naming it: we never guess.

Templates that know nothing of tool calls (SmolLM2's ChatML, most base-model templates) would render a
turn that only calls tools as an empty turn. `tool_support` detects, per template, what it renders;
what it ignores is written as text (the Hermes/Qwen convention) by `prepare`:

* each call is appended to its turn's content as `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`
  (one block per call, blocks separated by a newline, ARGS the arguments' JSON object);
* tool schemas go into the system turn (one is prepended when there is none): TOOLS_HEADER, then
  `<tools>`, one JSON schema per line, `</tools>`;
* tool results, when the template ignores the `tool` role, become one user turn per run of results,
  each result as `<tool_response>\n...\n</tool_response>`.
An assistant turn that still renders nothing of its own (only template text) raises TemplateError.

Every exception the template raises becomes TemplateError (a ValueError) whose message starts with
"chat template: ", followed by the template's own message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.messages import call_arguments, compact_all, for_template

# Written into the system turn before the schemas when the template ignores `tools` (see module doc).
TOOLS_HEADER = ("You may call one or more functions to assist with the user query. The function signatures "
                "are within <tools></tools> XML tags. To call a function, reply with a JSON object holding its "
                "name and arguments within <tool_call></tool_call> XML tags.")

# Placeholder text, call name and call arguments of the stand-ins that replace a turn while it is
# located (slow path). Their first and last characters differ, so when the turn's own text happens to
# begin or end like the first, the second still differs there.
_STAND_INS = (("Qx", "qx", {"q": "x"}), ("Zy", "zy", {"z": 7}))

# The fixed conversation `tool_support` renders.
_PROBE_RESULT = "curate-probe-result-5f1c"
_PROBE_USER = {"role": "user", "content": "What is the weather in Paris?"}
_FOLLOW_USER = {"role": "user", "content": "Wv"}  # follows a turn to render it as not the last one
_PROBE_CALL = {"id": "call_0", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
_PROBE_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

_SUPPORT: dict[str, dict] = {}  # tool_support per template sha256


class TemplateError(ValueError):
    """The chat template refused the record (its own message follows), or an assistant turn cannot be
    found in, or renders nothing of its own in, the rendered text. str(e) starts with "chat template: "."""


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]   # 1 where the token is an assistant token (a training target)
    truncated: bool
    # how tool calls, schemas and results reached the template: "template" (all through its own
    # rendering), "text" (some written as text by `prepare`), None (the record has none)
    tool_rendering: str | None = None

    @property
    def n_loss_tokens(self) -> int:
        return sum(self.loss_mask)


# ----------------------------------------------------------------------------------------------- templates

def template_text(tokenizer, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
    """The template text `apply_chat_template` would use: `chat_template` (a template, or the name of one
    of the tokenizer's named templates) or the tokenizer's own. TemplateError when there is none."""
    try:
        return tokenizer.get_chat_template(chat_template, tools or None)
    except Exception as e:  # noqa: BLE001 - transformers says why in a ValueError
        raise _template_error(e) from e


def template_sha256(tokenizer, chat_template: str | None = None) -> str:
    """Hex sha256 of the template text used (UTF-8): what a manifest records to identify it."""
    return hashlib.sha256(template_text(tokenizer, chat_template).encode("utf-8")).hexdigest()


def tool_support(tokenizer, chat_template: str | None = None) -> dict[str, bool]:
    """What the template renders of tools: {"tool_calls": bool, "tools": bool, "tool_role": bool}.

    Found by rendering a fixed conversation with and without each feature (equal text, or an error,
    means ignored): `tool_calls`, an assistant turn's calls; `tools`, the schemas passed as
    `apply_chat_template(tools=...)`; `tool_role`, the text of a `tool` turn. Cached per template text."""
    return dict(_support(tokenizer, template_text(tokenizer, chat_template)))


def _support(tokenizer, template: str) -> dict[str, bool]:
    key = hashlib.sha256(template.encode("utf-8")).hexdigest()
    if key not in _SUPPORT:
        _SUPPORT[key] = _detect_support(tokenizer, template)
    return _SUPPORT[key]


def _detect_support(tokenizer, template: str) -> dict[str, bool]:
    def text(messages, tools=None):
        try:
            return _render(tokenizer, template, for_template(messages), tools)
        except TemplateError:
            return None

    calling = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    with_calls = text([_PROBE_USER, calling])
    without = text([_PROBE_USER, {"role": "assistant", "content": ""}])
    calls = with_calls is not None and (with_calls != without if without is not None else
                                        "get_weather" in with_calls)
    reply = {"role": "assistant", "content": "It is sunny."}
    plain = text([_PROBE_USER, reply])
    with_tools = text([_PROBE_USER, reply], [_PROBE_TOOL])
    tools = with_tools is not None and with_tools != plain
    if not calls:
        calling = {"role": "assistant", "content": tool_call_text(_PROBE_CALL)}
    result = {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "call_0", "name": "get_weather"}
    with_result = text([_PROBE_USER, calling, result, reply])
    return {"tool_calls": calls, "tools": tools, "tool_role": with_result is not None and _PROBE_RESULT in with_result}


def _render(tokenizer, template: str, messages: list[dict], tools: list[dict] | None,
            generation_prompt: bool = False) -> str:
    """apply_chat_template on messages already in template form; every error becomes TemplateError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template can raise anything (raise_exception, TypeError, ...)
        raise _template_error(e) from e


def _template_error(e: Exception) -> TemplateError:
    import jinja2

    if isinstance(e, TemplateError):
        return e
    # raise_exception(...) in a template raises jinja2's base TemplateError with the template's words
    message = str(e) if type(e) is jinja2.exceptions.TemplateError else f"{type(e).__name__}: {e}"
    return TemplateError(f"chat template: {message}")


# ------------------------------------------------------------------------------------ tools written as text

def tool_call_text(call: dict) -> str:
    """One call in the text form: `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, ARGS the
    arguments' JSON object (key order kept; arguments that are not a JSON object are written as given)."""
    fn = call["function"]
    args = call_arguments(fn.get("arguments"))
    args = json.dumps(args, ensure_ascii=False) if isinstance(args, dict) or not isinstance(args, str) else args
    return f'<tool_call>\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'


def tools_text(tools: list[dict]) -> str:
    """The schemas in the text form: TOOLS_HEADER, `<tools>`, one compact JSON schema per line, `</tools>`."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return f"{TOOLS_HEADER}\n<tools>\n{lines}\n</tools>"


def prepare(tokenizer, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None
            ) -> tuple[list[dict], list[dict] | None, str | None, list[int | None]]:
    """What goes to the template: (messages in template form, tools to pass, tool_rendering, origin).

    Messages are compacted (null fields dropped) and call arguments parsed (`messages.for_template`);
    what the template ignores of tools is written as text (module doc). tool_rendering is None when the
    record has no tools, calls or tool turns, "text" when any of them was written as text, else
    "template". origin[j] is the index in `messages` of prepared message j (None for a system turn
    added to hold the schemas; a run of tool results merged into one user turn has its first index)."""
    return _prepare(tokenizer, template_text(tokenizer, chat_template, tools), messages, tools)


def _prepare(tokenizer, template: str, messages: list[dict], tools: list[dict] | None):
    msgs = compact_all(messages)
    origin: list[int | None] = list(range(len(msgs)))
    has_calls = any(m.get("tool_calls") for m in msgs)
    has_results = any(m["role"] == "tool" for m in msgs)
    if not (tools or has_calls or has_results):
        return for_template(msgs), None, None, origin
    support = _support(tokenizer, template)
    as_text = False
    if has_calls and not support["tool_calls"]:
        as_text = True
        msgs = [_calls_as_text(m) if m.get("tool_calls") else m for m in msgs]
    if has_results and not support["tool_role"]:
        as_text = True
        msgs, origin = _results_as_text(msgs, origin)
    if tools and not support["tools"]:
        as_text = True
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs = [{**msgs[0], "content": f"{system}\n\n{tools_text(tools)}" if system else tools_text(tools)},
                    *msgs[1:]]
        else:
            msgs, origin = [{"role": "system", "content": tools_text(tools)}, *msgs], [None, *origin]
        tools = None
    return for_template(msgs), tools or None, "text" if as_text else "template", origin


def turn_text(message: dict) -> str:
    """An assistant turn as one text: its content, then each call in the text form (`tool_call_text`),
    separated by newlines; what a turn becomes for a template that ignores calls, and what exports that
    take a reply as a string get (null fields, as Arrow rows have them, allowed)."""
    content = message.get("content") or ""
    blocks = "\n".join(tool_call_text(c) for c in message.get("tool_calls") or ())
    return f"{content}\n{blocks}" if content and blocks else content or blocks


def _calls_as_text(m: dict) -> dict:
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    out["content"] = turn_text(m)
    return out


def _results_as_text(msgs: list[dict], origin: list) -> tuple[list[dict], list]:
    out, out_origin = [], []
    for m, o in zip(msgs, origin):
        if m["role"] != "tool":
            out.append(m)
            out_origin.append(o)
            continue
        block = f"<tool_response>\n{m['content']}\n</tool_response>"
        if out and out[-1].get("_results"):  # a run of results is one user turn (no user/user pairs)
            out[-1]["content"] += "\n" + block
        else:
            out.append({"role": "user", "content": block, "_results": True})
            out_origin.append(o)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out], out_origin


# ------------------------------------------------------------------------------------------------ rendering

def render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None,
           chat_template: str | None = None) -> str:
    """The conversation as the template renders it (after `prepare`: null fields dropped, tools the
    template ignores written as text). TemplateError when the template refuses it."""
    template = template_text(tokenizer, chat_template, tools)
    msgs, tools, _, _ = _prepare(tokenizer, template, messages, tools)
    return _render(tokenizer, template, msgs, tools, generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn, in order
    (see the module doc for what a span covers). TemplateError when the template refuses the record or
    a turn cannot be located or renders nothing of its own."""
    text, spans, _ = _layout(tokenizer, messages, tools, chat_template)
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int | None = None, tools: list[dict] | None = None,
           chat_template: str | None = None) -> Encoded:
    """Token ids of the rendered conversation and the assistant-only loss mask (same length).

    `messages`: canonical messages (null optional fields allowed, as read from Arrow); `tools`: the
    record's function schemas (a list, or None); `chat_template`: a template text used instead of the
    tokenizer's (e.g. for a base model without one). Over `max_length` tokens the start is cut so the
    last turns are kept (`truncated`). A token is a target when it starts inside an assistant span.
    Raises TemplateError (a ValueError, "chat template: ...")."""
    text, spans, rendering = _layout(tokenizer, messages, tools, chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask, s = [0] * len(ids), 0
    for t, (a, b) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= a:
            s += 1
        if s < len(spans) and spans[s][0] <= a < spans[s][1] and b > a:
            mask[t] = 1
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[-max_length:], mask[-max_length:]
    return Encoded(ids, mask, truncated, rendering)


def _layout(tokenizer, messages, tools, chat_template):
    template = template_text(tokenizer, chat_template, tools)  # chosen with the record's tools (named templates)
    msgs, tools, rendering, origin = _prepare(tokenizer, template, messages, tools)
    layout = _Layout(tokenizer, template, tools, msgs, origin)
    return layout.text, layout.spans(), rendering


class _Layout:
    """Finds the span of every assistant turn in the rendered text (module doc: fast and slow path)."""

    def __init__(self, tokenizer, template: str, tools, messages: list[dict], origin: list):
        self.tokenizer, self.template, self.tools, self.m, self.origin = tokenizer, template, tools, messages, origin
        self._prefixes: dict[tuple[int, bool], str] = {}
        self._special_ids: set[int] | None = None
        self._piece: str | None = None
        self._diffs: dict[tuple[int, int], tuple[int, int] | None] = {}
        self._lasts: dict[tuple[int, int], str] = {}
        self.text = self.prefix(len(messages))

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return _render(self.tokenizer, self.template, messages, self.tools, generation_prompt)

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
            span = self._by_prefixes(i, cursor)
            if span is None:
                span = self._in_context(i, cursor)
            elif not self._shows_own_text(i, span):
                raise TemplateError(f"chat template: {self.name(i)} renders no tokens")
            spans.append(span)
            cursor = span[1]
        return spans

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
        the full text, when that is between the turn before and u; else at u, where the turn's own
        text begins."""
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
            if cursor <= at <= u:
                return at
        if u < cursor:
            raise TemplateError(f"chat template: {self.name(i)} does not appear after the turn before it")
        return u

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
            context = [for_template([_PROBE_USER])[0]]
            try:
                prompt, bare = self.render(context, True), self.render(context)
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
        if self._piece is None:
            first = for_template([_PROBE_USER])
            try:
                one, two = self.render(first), self.render(first + [_FOLLOW_USER])
            except TemplateError:
                one, two = "", ""
            self._piece = two[len(one):] if one and two.startswith(one) else ""
        return self._piece

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
        if self._special_ids is None:
            self._special_ids = {*self.tokenizer.all_special_ids, *getattr(self.tokenizer, "added_tokens_decoder", {})}
        return self._special_ids


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


# ---------------------------------------------------------------------------------------------------- prompts

def prompt_column(messages: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """`prompt_messages` of every row of an Arrow list<struct<role, content>> column, without building a
    Python object per message (route runs it on every routed row)."""
    arr = messages.combine_chunks() if isinstance(messages, pa.ChunkedArray) else messages
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = arr.flatten()
    is_assistant = pc.equal(pc.struct_field(flat, "role"), "assistant").fill_null(False).to_numpy(zero_copy_only=False)
    at = np.nonzero(is_assistant)[0]
    rows, first = np.unique(pc.list_parent_indices(arr).to_numpy()[at], return_index=True)
    keep = lengths.copy()                      # no assistant turn: the whole conversation
    keep[rows] = at[first] - starts[rows]
    offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
    take = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, keep)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.take(pa.array(take, pa.int64())), type=arr.type)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """Messages before the first assistant turn (what a policy is given to answer)."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return messages[:i]
    return list(messages)
