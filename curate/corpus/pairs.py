"""IRFT's corpus step for one shard: DPO pairs (demonstration chosen, the generator's reply rejected) with
implicit rewards r = beta * (log pi(y|x) - log pi_ref(y|x)) (Li et al., NeurIPS 2024), and a bounded-memory
win rate of the demonstration over the generation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema

PAIRS = "pairs"


def pair_rows(records: pa.Table, cont: pa.Table, scores: pa.Table, stage: int, beta: float,
              generator: str, signals: pa.Table | None = None) -> tuple[pa.Table, int]:
    """One shard's DPO rows for `stage` (identical pairs dropped), and the number dropped. All tables
    have one row per record; `signals`: the job's signal stage columns, carried by each pair (ValueError
    for one the pairs schema does not declare)."""
    if signals is not None:
        schema.check_declared(signals.column_names, PAIRS)
        records = _joined(records, signals)   # filtered with the records, taken back out below
    mine = pc.and_(pc.equal(cont.column("stage"), stage), pc.is_valid(cont.column("prompt")))
    records, cont, scores = records.filter(mine), cont.filter(mine), scores.filter(mine)
    different = pc.not_equal(cont.column("chosen_text"), cont.column("rejected_text"))
    dropped = cont.num_rows - (pc.sum(different).as_py() or 0)
    records, cont, scores = records.filter(different), cont.filter(different), scores.filter(different)
    n = records.num_rows
    logp = {c: scores.column(c).to_numpy() for c in ("chosen_logps", "rejected_logps", "ref_chosen_logps",
                                                     "ref_rejected_logps")}
    cols = {
        **{c: records.column(c) for c in ("id", "source", "source_index")},
        "prompt": cont.column("prompt"), "chosen": cont.column("chosen"),
        "rejected": reply(cont.column("rejected_text")), "tools": cont.column("tools"), "stage": cont.column("stage"),
        "generator": [generator] * n, **logp,
        "implicit_reward_chosen": beta * (logp["chosen_logps"] - logp["ref_chosen_logps"]),
        "implicit_reward_rejected": beta * (logp["rejected_logps"] - logp["ref_rejected_logps"]),
        "logp_gap": logp["chosen_logps"] - logp["rejected_logps"],
        **{c: scores.column(c) for c in ("rm_score_chosen", "rm_score_rejected", "chosen_len_tokens",
                                          "rejected_len_tokens")},
        **({c: records.column(c) for c in signals.column_names} if signals is not None else {}),
    }
    target = schema.arrow_schema(PAIRS)
    return pa.table({name: cols[name] for name in target.names}).cast(target), dropped


def _joined(records: pa.Table, signals: pa.Table) -> pa.Table:
    """`records` with the signal columns beside its own (a signal column named like a record column wins)."""
    for name in signals.column_names:
        if name in records.column_names:
            records = records.drop_columns([name])
        records = records.append_column(name, signals.column(name))
    return records


def reply(texts: pa.ChunkedArray) -> pa.Array:
    """Each generated text as a one-message assistant conversation (schema.MESSAGES), one row per text; a
    null text gives a message with null content."""
    return pa.array([[{"role": "assistant", "content": t}] for t in texts.to_pylist()], schema.MESSAGES)


class WinRate:
    """Running share of pairs where the demonstration scores higher than the generation (ties apart):
    counts, not every score, so the corpus pass stays in bounded memory."""

    def __init__(self):
        self.pairs = self.wins = self.ties = 0
        self.margin = 0.0

    def add(self, chosen: pa.ChunkedArray, rejected: pa.ChunkedArray) -> None:
        """Count one batch of pairs, `chosen` and `rejected` holding one score per pair. A null score reads as
        NaN: neither a win nor a tie, and it makes the mean margin NaN."""
        c = chosen.to_numpy(zero_copy_only=False).astype(np.float64)
        r = rejected.to_numpy(zero_copy_only=False).astype(np.float64)
        self.pairs += len(c)
        self.wins += int(np.sum(c > r))
        self.ties += int(np.sum(c == r))
        self.margin += float(np.sum(c - r))

    def summary(self) -> dict | None:
        """Shares of pairs the demonstration won (`demo_wins`) and tied (`ties`), the pair count and the mean
        margin (chosen - rejected score); None before any pair."""
        if not self.pairs:
            return None
        return {"demo_wins": self.wins / self.pairs, "ties": self.ties / self.pairs, "pairs": self.pairs,
                "mean_margin": self.margin / self.pairs}
