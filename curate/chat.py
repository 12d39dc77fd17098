"""Chat-template encoding with an assistant-only loss mask.

Templates rarely mark where assistant text starts and ends, so we find it by rendering: the text of
messages[:i] with the generation prompt is where assistant turn i starts, the text of messages[:i+1] is
where it ends (its end-of-turn token included, trailing whitespace not). Tokenising the whole text once
and masking tokens by character offset gives exactly the tokens a trainer sees."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]   # 1 where the token is an assistant token (a training target)
    truncated: bool

    @property
    def n_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn."""
    text = render(tokenizer, messages)
    spans, cursor = [], 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if i and text.startswith(head) and text.startswith(upto) and len(head) < len(upto):
            start, end = len(head), len(upto.rstrip())
        else:  # template rewrites history (e.g. strips reasoning): fall back to finding the content
            start = text.find(msg["content"], cursor)
            if start < 0:
                raise ValueError(f"assistant turn {i} does not appear in the rendered chat template")
            end = start + len(msg["content"])
        spans.append((start, end))
        cursor = end
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int | None = None) -> Encoded:
    """Token ids and assistant mask; over max_length, the start is cut so the last turns are kept."""
    text, spans = assistant_spans(tokenizer, messages)
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
    return Encoded(ids, mask, truncated)


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
