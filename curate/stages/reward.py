"""Stage `reward`: an explicit reward model's score of every demonstration (`--reward-model DIR`).

The whole conversation is scored, rendered with the reward model's own chat template (curate.rewards).
A signal column like the others: route keeps it on every row and never decides by it."""

from __future__ import annotations

import pyarrow as pa

from curate import rewards
from curate.messages import parse_tools
from curate.stages.base import MODEL_LIBRARIES, Stage, shard_rows


class Reward(Stage):
    """The reward model's score of every record's whole conversation: `rm_score`, one float32 per record."""

    name = "reward"
    libraries = MODEL_LIBRARIES
    runs_model = True
    reads = ("messages", "tools")
    writes = pa.schema([("rm_score", pa.float32())])

    def cost(self, source: str) -> int:
        """Records to score."""
        return shard_rows(source)

    def run(self, shard: pa.Table) -> pa.Table:
        c = self.config
        tools = [parse_tools(t) for t in shard.column("tools").to_pylist()]
        scores = rewards.score(c.reward_model, shard.column("messages").to_pylist(), c.device, c.batch_tokens,
                               c.trust_remote_code, tools)
        return self.check(shard, pa.table({"rm_score": scores}))
