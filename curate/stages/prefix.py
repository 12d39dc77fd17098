"""Stage `prefix`: Prefix-RFT annotations. For every demonstration, the text a trainer would splice in
as a prefix (`demo`), its length in tokens and the token offsets where a cut is clean.

Prefix-RFT (Huang et al., 2025) replaces one rollout per group with y*_{<L} plus the policy's
continuation, L = floor(l * |y*|) for a ratio l drawn by the trainer. Cutting mid-word or mid-number
hands the policy a broken token to continue from, so we list the offsets L where the prefix ends at a
line end, a sentence end or a turn boundary, and the trainer snaps its L to the nearest one. The ratio
and its schedule stay the trainer's.

`demo` is everything the policy would generate after the prompt: the rendered text from the first
assistant turn to the end of the last one, before the token that closes it (observations and template
markup included, exactly as the model sees them; for a plain single reply, its content). Token offsets
count tokens of `tokenizer(demo, add_special_tokens=False)`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pyarrow as pa

from curate import chat, models
from curate.messages import parse_tools
from curate.stages.base import TOKENIZER_LIBRARIES, Stage

# a cut after a token whose text ends a line, or ends a sentence and is followed by whitespace
_LINE_END = re.compile(r"\n\s*$")
_SENTENCE_END = re.compile(r"[.!?。！？][\"')\]]*\s*$")


@dataclass(frozen=True)
class Demo:
    """One record's Prefix-RFT annotation: the demonstration after the prompt, its length in tokens and the
    clean cut points (token counts L, 0 < L < n_tokens)."""

    text: str
    n_tokens: int
    cut_points: list[int]


def demo_text(tokenizer, messages: list[dict], tools: list[dict] | None = None,
              chat_template: str | None = None) -> tuple[str, list[int]]:
    """The demonstration after the prompt, and the character offsets (in it) where assistant turns
    after the first begin: turn boundaries of an agent transcript. Tool calls and results are in it as
    the template renders them (with `tools`)."""
    text, spans = chat.assistant_spans(tokenizer, messages, tools, chat_template)
    if not spans:
        return "", []
    start, end = spans[0][0], spans[-1][1]
    # a span ends with what the template writes to close the last turn (<|im_end|>, <|end|>\n<|endoftext|>):
    # the policy's stop, not part of the demonstration. Everything the turn writes before it stays: its
    # reasoning, its text and its tool calls, to the last character
    closing = _closing(tokenizer, chat_template)
    if closing and text.endswith(closing, start, end):
        end -= len(closing)
    return text[start:end], [s - start for s, _ in spans[1:]]


def _closing(tokenizer, chat_template: str | None) -> str:
    """What the template writes after the last reply of a conversation: the common end of the spans of two
    one-reply conversations that differ only in their reply. Worked out once per tokenizer and template."""
    known = tokenizer.__dict__.setdefault("_curate_closing", {})
    if chat_template not in known:
        ends = []
        for reply in ("x", "y"):
            text, spans = chat.assistant_spans(tokenizer, [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": reply}], None, chat_template)
            ends.append(text[spans[-1][0]:spans[-1][1]][::-1])
        known[chat_template] = os.path.commonprefix(ends)[::-1]
    return known[chat_template]


def cut_points(text: str, offsets: list[tuple[int, int]], turn_starts: list[int]) -> list[int]:
    """Token counts L (0 < L < n) after which the prefix ends cleanly."""
    n, cuts = len(offsets), set()
    starts = set(turn_starts)
    for t, (a, b) in enumerate(offsets[:-1]):
        piece, after = text[a:b], text[b:b + 1]
        if _LINE_END.search(piece) or (_SENTENCE_END.search(piece) and (after.isspace() or not after)):
            cuts.add(t + 1)
        if offsets[t + 1][0] in starts:
            cuts.add(t + 1)
    return sorted(c for c in cuts if 0 < c < n)


def annotate(tokenizer, messages: list[dict], tools: list[dict] | None = None,
             chat_template: str | None = None) -> Demo | None:
    """The Demo of one conversation (None when nothing follows the prompt); TemplateError when the
    template refuses it, and whatever the tokenizer raises."""
    text, turn_starts = demo_text(tokenizer, messages, tools, chat_template)
    if not text:
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Demo(text, len(enc["input_ids"]), cut_points(text, enc["offset_mapping"], turn_starts))


class Prefix(Stage):
    """Prefix-RFT annotations per shard (module doc): demo, demo_len_tokens, cut_points; null for a record
    the template or tokenizer refuses."""

    name = "prefix"
    libraries = TOKENIZER_LIBRARIES
    # 2: the demonstration ends before the last turn's closing token, not after the first match of its content
    # (which dropped a tool call after the text, or matched the text inside the turn's own reasoning)
    version = {"demo": 2}
    reads = ("messages", "tools")
    writes = pa.schema([("demo", pa.string()), ("demo_len_tokens", pa.int32()),
                        ("cut_points", pa.list_(pa.int32()))])

    def run(self, shard: pa.Table) -> pa.Table:
        c = self.config
        tok = models.load_tokenizer(models.resolve(c.tokenizer, c.trust_remote_code),
                                    require_template=c.chat_template is None)
        rows = {k: [] for k in self.writes.names}
        for messages, tools in zip(shard.column("messages").to_pylist(), shard.column("tools").to_pylist()):
            try:
                demo = annotate(tok, messages, parse_tools(tools), c.chat_template)
            except chat.NOT_RECORD_ERRORS:  # the machine's or the files', not this record's
                raise
            except Exception:  # noqa: BLE001 - anything the template or tokenizer raises on this record:
                demo = None    # no annotations; the tokenize stage quarantines it with the reason
            rows["demo"].append(demo.text if demo else None)
            rows["demo_len_tokens"].append(demo.n_tokens if demo else None)
            rows["cut_points"].append(demo.cut_points if demo else None)
        return self.check(shard, pa.table(rows))
