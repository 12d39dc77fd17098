"""Stage `pair_scores`: log-probs of y and ỹ under the policy and the reference, and reward-model scores.

Sums are over the reply tokens as TRL's DPOTrainer tokenises them (curate.logprobs), in batched forward
passes. When the reference is the policy (the default: the stage-start model, as in the IRFT authors'
code) it is computed once. beta is applied when the pairs are written, so a new beta costs no forward
pass."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate import logprobs, models, rewards
from curate.messages import parse_tools
from curate.stages.base import MODEL_LIBRARIES, Stage, shard_rows

LOGP_COLUMNS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


class PairScores(Stage):
    """Per pair: summed log-probs (nats) of y and ỹ given the prompt under the policy and the reference
    (float64), reward-model scores (float32) and reply lengths in tokens; null for rows without a prompt
    (the rm scores also without --reward-model)."""

    name = "pair_scores"
    libraries = MODEL_LIBRARIES
    runs_model = True
    reads = ("prompt", "chosen", "rejected_text", "tools")
    writes = pa.schema([*[(c, pa.float64()) for c in LOGP_COLUMNS],
                        ("rm_score_chosen", pa.float32()), ("rm_score_rejected", pa.float32()),
                        ("chosen_len_tokens", pa.int32()), ("rejected_len_tokens", pa.int32())])

    cost_unit = "pair"

    def cost(self, source: str) -> int:
        """Pairs to score (rows of the continuation shard)."""
        return shard_rows(source)

    def run(self, shard: pa.Table) -> pa.Table:
        c = self.config
        device = models.resolve_device(c.device)
        prompts = shard.column("prompt").to_pylist()
        todo = [i for i, p in enumerate(prompts) if p is not None]
        tools = [parse_tools(t) for t in shard.column("tools").to_pylist()]
        # y is the demonstration's whole turn (tool calls included); ỹ is the generated text
        chosen = [turn[0] if turn else None for turn in shard.column("chosen").to_pylist()]
        rejected = [None if t is None else {"role": "assistant", "content": t}
                    for t in shard.column("rejected_text").to_pylist()]
        n = shard.num_rows
        cols = {name: np.full(n, np.nan) for name in LOGP_COLUMNS + ("rm_score_chosen", "rm_score_rejected")}
        lens = {"chosen_len_tokens": [None] * n, "rejected_len_tokens": [None] * n}
        if todo:
            policy = models.resolve(c.model, c.trust_remote_code)
            tok = models.load_tokenizer(policy)
            for side, texts in (("chosen", chosen), ("rejected", rejected)):
                pairs = [logprobs.split_ids(tok, prompts[i], texts[i], tools[i]) for i in todo]
                for i, (_, reply) in zip(todo, pairs):
                    lens[f"{side}_len_tokens"][i] = len(reply)
                logp = logprobs.sequence_logps(models.load_model(policy, device), pairs, c.batch_tokens, device)
                cols[f"{side}_logps"][todo] = logp
                if c.ref_model and models.resolve(c.ref_model, c.trust_remote_code) != policy:
                    ref = models.resolve(c.ref_model, c.trust_remote_code)
                    if models.load_tokenizer(ref).get_vocab() != tok.get_vocab():
                        raise models.ModelError(f"{c.ref_model}: the reference must share the policy's tokenizer")
                    logp = logprobs.sequence_logps(models.load_model(ref, device), pairs, c.batch_tokens, device)
                cols[f"ref_{side}_logps"][todo] = logp
                if c.reward_model:
                    convs = [[*prompts[i], texts[i]] for i in todo]
                    cols[f"rm_score_{side}"][todo] = rewards.score(c.reward_model, convs, c.device, c.batch_tokens,
                                                                     c.trust_remote_code, [tools[i] for i in todo])
        out = {k: pa.array(v, mask=np.isnan(v)) for k, v in cols.items()}
        out.update({k: pa.array(v, pa.int32()) for k, v in lens.items()})
        return self.check(shard, pa.table(out))
