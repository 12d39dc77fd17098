"""Stage `reward`: an explicit reward model's score of every demonstration (`--reward-model DIR`).

The whole conversation is scored, rendered with the reward model's own chat template (curate.rewards).
A signal column like the others: route keeps it on every row and never decides by it."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from curate import models, rewards
from curate.messages import parse_tools
from curate.stages.base import Stage


@dataclass
class RewardConfig:
    reward_model: str                 # an AutoModelForSequenceClassification folder
    device: str = "auto"
    batch_tokens: int = 8192
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)


class Reward(Stage):
    name = "reward"
    runs_model = True
    reads = ("messages", "tools")
    writes = pa.schema([("rm_score", pa.float32())])

    def identity(self) -> dict:
        return {"stage": self.name, "reward_model": models.identity(models.resolve(self.config.reward_model, self.config.trust_remote_code))}

    def run(self, shard: pa.Table) -> pa.Table:
        c = self.config
        tools = [parse_tools(t) for t in shard.column("tools").to_pylist()]
        scores = rewards.score(c.reward_model, shard.column("messages").to_pylist(), c.device, c.batch_tokens,
                               c.trust_remote_code, tools)
        return self.check(shard, pa.table({"rm_score": scores}))
