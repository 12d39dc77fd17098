"""Stage `tokenize`: chat template + assistant-only loss mask, explicit left truncation."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from tqdm.auto import tqdm

from curate import chat, models
from curate.stages.base import Stage


@dataclass
class TokenizeConfig:
    model: str | None = None          # whose tokenizer and chat template (the probe model's)
    max_length: int | None = None     # cut the start of longer examples, keeping the last turns
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)


class Tokenize(Stage):
    name = "tokenize"
    reads = ("messages",)
    writes = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                        ("n_tokens", pa.int64()), ("n_loss_tokens", pa.int64()), ("truncated", pa.bool_()),
                        ("token_error", pa.string())])

    def identity(self) -> dict:
        ref = models.resolve(self.config.model, self.config.trust_remote_code)
        return {**super().identity(), "tokenizer": models.identity(ref)}

    def run(self, shard: pa.Table) -> pa.Table:
        tok = models.load_tokenizer(models.resolve(self.config.model, self.config.trust_remote_code))
        rows = {k: [] for k in self.writes.names}
        for messages in tqdm(shard.column("messages").to_pylist(), desc="tokenize", unit="ex", leave=False):
            error = None
            try:
                enc = chat.encode(tok, messages, self.config.max_length)
                if enc.n_loss_tokens == 0:
                    error = (f"no assistant tokens left after truncation to {self.config.max_length} tokens"
                             if enc.truncated else "no assistant tokens after the chat template")
            except ValueError as e:
                enc, error = chat.Encoded([], [], False), f"chat template: {e}"
            rows["input_ids"].append(enc.input_ids)
            rows["loss_mask"].append(enc.loss_mask)
            rows["n_tokens"].append(len(enc.input_ids))
            rows["n_loss_tokens"].append(enc.n_loss_tokens)
            rows["truncated"].append(enc.truncated)
            rows["token_error"].append(error)
        return self.check(shard, pa.table(rows))
