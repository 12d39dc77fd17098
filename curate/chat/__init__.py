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

Both paths render the conversation once or more per turn, each time up to or past the turn: a record
of n turns would cost n renders of up to n messages (an 800-turn record took seconds, a few thousand
turns minutes). So a record of WINDOW_FROM messages or more (chat/spans.py: `locate`) is rendered
whole once, and its turns are located, by the same rules, in windows of a few dozen messages (the
record's first messages, then those around a few consecutive turns), each placed in the full text by
anchors (a mark inserted in each message's content, rendered once with the full conversation and once
with the window) and held to it: the window's text around the turns must be exactly the full text
there. Where a window does not hold (a template that renders a turn by what is far from it), those
turns are located in the whole conversation as above. Linear in the turns for templates that render
each turn from its neighbourhood (every one shipped with TRL that we test, tools and reasoning
included); the spans are the same either way.

Templates that know nothing of tool calls (SmolLM2's ChatML, most base-model templates) would render a
turn that only calls tools as an empty turn, and most templates drop `reasoning_content`.
`tool_support` (chat/tool_text.py) detects, per template, what it renders; what it ignores is written
as text (the Hermes/Qwen convention) by `prepare`:

* reasoning goes into its turn's content as `<think>\n{reasoning}\n</think>\n\n{content}`;
* each call is appended to its turn's content as `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`
  (one block per call, blocks separated by a newline, ARGS the arguments' JSON object);
* tool schemas go into the system turn (one is prepended when there is none): TOOLS_HEADER, then
  `<tools>`, one JSON schema per line, `</tools>`; for a template without a system role (Gemma), at
  the top of the first user turn, a blank line before the user's text;
* tool results, when the template ignores the `tool` role, become one user turn per run of results,
  each result as `<tool_response>\n...\n</tool_response>`.
Call arguments go to the template as the input's JSON text when it writes such text as it is (Qwen3,
DeepSeek-V3: what trainers rendering exported messages give it), else parsed into a dict.
An assistant turn that still renders nothing of its own (only template text) raises TemplateError.

Every exception the template raises becomes TemplateError (a ValueError) whose message starts with
"chat template: ", followed by the template's own message (jinja2's `raise_exception`) or the
exception's type and message ("chat template: SecurityError: access to attribute ..."); one the
tokenizer raises on the rendered text becomes TokenizerError ("tokenizer: TYPE: ..."). Stages quarantine
a record with `record_error(e)` for any exception but NOT_RECORD_ERRORS (MemoryError, OSError: the
machine's or the files', never the record's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.chat.spans import locate
from curate.chat.templates import (NOT_RECORD_ERRORS, TemplateError, TokenizerError, check_template, record_error,
                                   render_template, template_sha256, template_text)
from curate.chat.tool_text import TOOLS_HEADER, prepare_for, prepare, tool_call_text, tool_support, tools_text, turn_text

__all__ = ["ENCODING_VERSION", "NOT_RECORD_ERRORS", "TOOLS_HEADER", "Encoded", "TemplateError", "TokenizerError",
           "assistant_spans", "check_template", "encode", "prepare", "prompt_column", "prompt_messages",
           "record_error", "render", "template_sha256", "template_text", "tool_call_text", "tool_support",
           "tools_text", "turn_text"]

# Changes whenever `encode` gives other ids or masks for some record (a cache key can include it):
# 2 = reasoning a template ignores written as text, schemas in the first user turn without a system
# role, arguments as given to templates that write them as text, 9-character probe call ids.
# 3 = the tokenize stage also reports what a template writes nowhere (`unrendered`).
# 4 = n_loss_tokens counts the tokens a model predicts (not the first one, which no position predicts).
# 5 = truncation drops what follows the last assistant token before it cuts the start.
ENCODING_VERSION = 5


@dataclass
class Encoded:
    """One conversation encoded by `encode`: token ids and loss mask of equal length (tokens), whether its
    start was cut, and how the template rendered its tool data."""

    input_ids: list[int]
    loss_mask: list[int]   # 1 where the token is an assistant token (a training target)
    truncated: bool
    # how tool calls, schemas, results and reasoning reached the template: "template" (all through its
    # own rendering), "text" (some written as text by `prepare`), None (the record has none of them)
    tool_rendering: str | None = None
    # what of the assistant turns the template writes nowhere (e.g. Llama-3.1 drops the text beside a
    # call, GPT-OSS all calls but the first): "content beside tool calls", "assistant content", "tool call"
    unrendered: tuple[str, ...] = ()

    @property
    def n_loss_tokens(self) -> int:
        """Number of target tokens: the ones in `loss_mask` after the first token, which no position predicts
        (a truncated example can start with an assistant token), so what the probe's mean NLL averages."""
        return sum(self.loss_mask[1:])


def render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None,
           chat_template: str | None = None) -> str:
    """The conversation as the template renders it (after `prepare`: null fields dropped, tools the
    template ignores written as text). TemplateError when the template refuses it."""
    template = template_text(tokenizer, chat_template, tools)
    msgs, tools, _, _ = prepare_for(tokenizer, template, messages, tools)
    return render_template(tokenizer, template, msgs, tools, generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn, in order
    (see the module doc for what a span covers). TemplateError when the template refuses the record or
    a turn cannot be located or renders nothing of its own."""
    text, spans, _, _ = _layout(tokenizer, messages, tools, chat_template)
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int | None = None, tools: list[dict] | None = None,
           chat_template: str | None = None) -> Encoded:
    """Token ids of the rendered conversation and the assistant-only loss mask (same length).

    `messages`: canonical messages (null optional fields allowed, as read from Arrow); `tools`: the
    record's function schemas (a list, or None); `chat_template`: a template text used instead of the
    tokenizer's (e.g. for a base model without one). Over `max_length` tokens, what follows the last
    target goes first, then the start is cut so the last turns are kept (`truncated`: the start was
    cut). A token is a target when it starts inside an assistant span.
    Raises TemplateError (a ValueError, "chat template: ...") or, when the tokenizer refuses the
    rendered text, TokenizerError (a ValueError, "tokenizer: ...")."""
    text, spans, rendering, msgs = _layout(tokenizer, messages, tools, chat_template)
    try:
        text.encode("utf-8")  # a lone surrogate: the tokenizer's own error would not say so
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NOT_RECORD_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer raises on this text is this record's
        raise TokenizerError(f"tokenizer: {type(e).__name__}: {e}") from e
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask, s = [0] * len(ids), 0
    for t, (a, b) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= a:
            s += 1
        if s < len(spans) and spans[s][0] <= a < spans[s][1] and b > a:
            mask[t] = 1
    truncated = False
    if max_length is not None and len(ids) > max_length:
        # what follows the last target changes no target's loss (the model is causal), so it goes first: a
        # conversation ending in a long tool result or user turn keeps its replies. Only a cut of the start
        # changes the scores (less context), and only that is `truncated`
        end = max((t + 1 for t, target in enumerate(mask) if target), default=len(ids))
        truncated = end > max_length
        ids, mask = ids[:end][-max_length:], mask[:end][-max_length:]
    return Encoded(ids, mask, truncated, rendering, unrendered(text, spans, msgs))


def _layout(tokenizer, messages, tools, chat_template):
    template = template_text(tokenizer, chat_template, tools)  # chosen with the record's tools (named templates)
    msgs, tools, rendering, origin = prepare_for(tokenizer, template, messages, tools)
    text, spans = locate(tokenizer, template, tools, msgs, origin)
    return text, spans, rendering, msgs


def unrendered(text: str, spans: list[tuple[int, int]], messages: list[dict]) -> tuple[str, ...]:
    """What of each assistant turn (template form) is not in its span: its text (the last 40 characters
    looked for, as templates trim and cut reasoning off the front) or a call's name. Sorted, each once."""
    found = set()
    replies = [m for m in messages if m["role"] == "assistant"]
    for m, (a, b) in zip(replies, spans):
        rendered, content = text[a:b], (m.get("content") or "").strip()
        if content and "</think>" not in content and content[-40:] not in rendered:
            found.add("content beside tool calls" if m.get("tool_calls") else "assistant content")
        if any(c["function"]["name"] not in rendered for c in m.get("tool_calls") or ()):
            found.add("tool call")
    return tuple(sorted(found))


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
