"""Explicit reward-model scores: any local transformers AutoModelForSequenceClassification folder.

A conversation is rendered with the reward model's own tokenizer and chat template (a reward model is
trained on its own format, not the policy's), batched by length with right padding. The score is the
model's single logit, read from the last real token of each row: we pass the attention mask and set the
model's pad id, and a row never depends on its batch mates (the test checks it)."""

from __future__ import annotations

import numpy as np
import torch

from curate import chat, models


@models.cached_while_unchanged(maxsize=2)
def load_reward_model(ref: models.ModelRef, device: str = "cpu"):
    """(model, tokenizer) of a reward model on `device`, in eval mode without gradients (cached per
    process, two at most). ModelError unless it has one output (num_labels=1), or when its tokenizer has
    no chat template."""
    from transformers import AutoModelForSequenceClassification

    with models.load_errors(ref, "reward model"):
        model = AutoModelForSequenceClassification.from_pretrained(
            ref.folder, gguf_file=ref.gguf_file, dtype=torch.float32, use_safetensors=ref.gguf_file is None,
            trust_remote_code=ref.trust_remote_code)
    if model.config.num_labels != 1:
        raise models.ModelError(f"{ref.name}: a reward model has one output (num_labels=1), "
                                f"this one has {model.config.num_labels}")
    tok = models.load_tokenizer(ref)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval().requires_grad_(False), tok


@torch.inference_mode()
def score(spec: str, conversations: list[list[dict]], device: str = "auto",
          batch_tokens: int = 8192, trust_remote_code: bool = False,
          tools: list[list[dict] | None] | None = None) -> np.ndarray:
    """One float score per conversation (float32 values); `tools`: each one's function schemas or None."""
    from curate.batching import token_batches

    ref = models.resolve(spec, trust_remote_code)
    dev = models.resolve_device(device)
    model, tok = load_reward_model(ref, dev)
    tools = tools if tools is not None else [None] * len(conversations)
    seqs = [tok(chat.render(tok, c, tools=t), add_special_tokens=False)["input_ids"]
            for c, t in zip(conversations, tools)]
    out = np.zeros(len(seqs), dtype=np.float32)
    for batch in token_batches([len(s) for s in seqs], batch_tokens):
        t = max(len(seqs[b]) for b in batch)
        ids = torch.full((len(batch), t), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(batch), t, dtype=torch.long)
        for row, b in enumerate(batch):
            ids[row, :len(seqs[b])] = torch.tensor(seqs[b])
            attention[row, :len(seqs[b])] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=attention.to(dev)).logits
        out[batch] = logits[:, 0].float().cpu().numpy()
    return out
