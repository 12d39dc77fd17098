"""Summed log-probabilities of replies under a causal LM, tokenised exactly as TRL's DPOTrainer does.

A reply's tokens are where tokenize(template(prompt + [reply])) leaves the common prefix with
tokenize(template(prompt, generation prompt)): the reply text, its end-of-turn marker and whatever the
template puts after it. Log-probs computed on the same tokens are what DPOTrainer would have computed as
its reference log-probs, so they can be handed to it precomputed (`ref_chosen_logps`,
`ref_rejected_logps`). The prompt ids are also the ones the generator continues from
(curate.generation uses `prompt_ids`), so a continuation is scored in the context it was sampled in."""

from __future__ import annotations

import numpy as np
import torch

from curate import chat


def prompt_ids(tokenizer, prompt: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt rendered with the chat template (with `tools`) and the generation prompt, as token ids."""
    text = chat.render(tokenizer, prompt, generation_prompt=True, tools=tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_ids(tokenizer, prompt: list[dict], reply: str | dict,
              tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(context ids, reply ids) of prompt + an assistant reply (its text, or the whole assistant message,
    tool calls included), split where the prompt alone diverges."""
    head = prompt_ids(tokenizer, prompt, tools)
    turn = {"role": "assistant", "content": reply} if isinstance(reply, str) else reply
    full = tokenizer(chat.render(tokenizer, [*prompt, turn], tools=tools), add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(head), len(full)) and head[n] == full[n]:
        n += 1
    return full[:n], full[n:]


@torch.inference_mode()
def sequence_logps(model, pairs: list[tuple[list[int], list[int]]], batch_tokens: int = 8192,
                   device: str = "cpu") -> np.ndarray:
    """Σ log p(reply tokens | context) for each (context ids, reply ids), summed in float64. Examples
    are packed by length into right-padded batches (the LM head runs on reply positions only); order is
    preserved."""
    from curate.gradients import target_logps
    from curate.batching import right_pad, token_batches

    out = np.zeros(len(pairs), dtype=np.float64)
    seqs = [c + r for c, r in pairs]
    masks = [[0] * len(c) + [1] * len(r) for c, r in pairs]
    for batch in token_batches([len(s) for s in seqs], batch_tokens):
        ids, attention, mask = right_pad([seqs[b] for b in batch], [masks[b] for b in batch], device)
        rows, logp = target_logps(model, ids, attention, mask, dtype=torch.float64)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=logp.device).index_add_(0, rows, logp)
        out[batch] = sums.cpu().numpy()
    return out
