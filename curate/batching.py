"""Packing variable-length examples into batches: which rows go together, and how they are padded.
Shared by the probe, log-probs, reward scoring and generation."""

from __future__ import annotations

import torch


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so that len(batch) * longest <= batch_tokens (one at least)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def right_pad(ids: list[list[int]], masks: list[list[int]], device: str):
    """(input_ids, attention_mask, loss_mask), each (B, T_max) int64 on `device`, padded on the right:
    causal attention keeps pads from touching real tokens, so each row's results are its own."""
    t = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), t, dtype=torch.long)
    attention = torch.zeros(len(ids), t, dtype=torch.long)
    loss_mask = torch.zeros(len(ids), t, dtype=torch.long)
    for r, (x, m) in enumerate(zip(ids, masks)):
        input_ids[r, : len(x)] = torch.tensor(x)
        attention[r, : len(x)] = 1
        loss_mask[r, : len(m)] = torch.tensor(m)
    return input_ids.to(device), attention.to(device), loss_mask.to(device)


def left_pad(ids: list[list[int]], pad: int, device: str):
    """(input_ids, attention_mask), each (B, T_max) int64 on `device`, padded on the left with `pad`:
    every row's next token is at the same position, as batched decoding needs."""
    t = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t), pad, dtype=torch.long)
    attention = torch.zeros(len(ids), t, dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, t - len(x):] = torch.tensor(x, dtype=torch.long)
        attention[r, t - len(x):] = 1
    return input_ids.to(device), attention.to(device)
