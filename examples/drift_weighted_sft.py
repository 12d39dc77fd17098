"""Weighted SFT on `curate drift` output with TRL (tested with trl 1.16).

No mainstream trainer reads a per-example weight, so this subclass of TRL's SFTTrainer does: each
example's loss is the token-mean NLL of its train_target (the final assistant turn, which is all DRIFT
trains), multiplied by its `weight`, then averaged over the batch:

    loss = mean_i  weight_i * mean_{t in target_i} -log p(token_t | context)

Usage (copy this file; it needs only trl, datasets and torch):

    python examples/drift_weighted_sft.py --drift drift/ --model path/to/policy --out ckpt/ [--max-steps N]
"""

from __future__ import annotations

import argparse
import glob

import datasets
import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer


def load_drift(folder: str) -> datasets.Dataset:
    """DRIFT rows as TRL prompt-completion examples: the context is the prompt, the final assistant turn
    the completion (so TRL masks the context out of the loss), plus the weight."""
    files = sorted(glob.glob(f"{folder}/sft/*.arrow"))
    ds = datasets.load_dataset("arrow", data_files=files, split="train")
    return ds.map(lambda r: {"prompt": r["train_context"],
                             "completion": [{"role": "assistant", "content": r["train_target"]}]},
                  remove_columns=[c for c in ds.column_names if c != "weight"])


class WeightCollator:
    """Wraps TRL's collator: takes `weight` out of each example and returns it as a batch tensor."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        weight = torch.tensor([float(e.pop("weight")) for e in examples], dtype=torch.float32)
        batch = self.inner(examples)
        batch["weight"] = weight
        return batch


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_i weight_i * (token-mean NLL of example i over its labelled tokens)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    nll = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    per_example = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (weight.to(per_example) * per_example).mean()


class WeightedSFTTrainer(SFTTrainer):
    loss_is_scaled_for_ga = False   # a per-batch mean: let Trainer divide by gradient accumulation steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = WeightCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()   # keep `weight` when unused columns are removed
        if "weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "weight"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight, labels = inputs.pop("weight"), inputs.pop("labels")
        outputs = model(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")},
                        use_cache=False)
        loss = weighted_nll(outputs.logits, labels, weight)
        return (loss, outputs) if return_outputs else loss


def train(drift_dir: str, model, out: str, max_steps: int = -1, batch_size: int = 4, **config) -> WeightedSFTTrainer:
    args = SFTConfig(output_dir=out, max_steps=max_steps, per_device_train_batch_size=batch_size,
                     report_to=[], save_strategy="no", logging_steps=1, **config)
    trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=load_drift(drift_dir))
    trainer.train()
    return trainer


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drift", required=True, help="output folder of `curate drift` (holds sft/)")
    p.add_argument("--model", required=True, help="HF model folder or hub id of the policy to train")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--epochs", type=float, default=1.0)
    a = p.parse_args()
    train(a.drift, a.model, a.out, a.max_steps, num_train_epochs=a.epochs).save_model(a.out)
