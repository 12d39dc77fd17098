"""Stage `rollout`: K multi-turn trajectories per prompt from the fixed reference policy, verified.

Turn 1 answers the record's prompt (the messages before its first assistant turn). After a wrong answer
the feedback message is appended and the policy answers again, up to `turns` answers or until correct.
Each turn generates for every still-active conversation of the shard in one batched call, so prompts
and samples share batches. Every (record, sample, turn) has its own seed: a record's trajectories do not
depend on the shard it is in.

With the `recorded` verifier nothing is generated: the record's conversation is the one trajectory and
its recorded reward the outcome (existing agent rollouts, e.g. ALFWorld).

Row-aligned like every per-shard stage: one row per record, holding lists over its K trajectories. The
returns and weights are computed later from these verdicts, so changing gamma, the penalties or beta never
regenerates."""

from __future__ import annotations

import pyarrow as pa

from curate import chat, generation, schema, verifiers
from curate.messages import parse_tools
from curate.stages.base import MODEL_LIBRARIES, Stage, shard_rows


def _bool_lists():
    return pa.list_(pa.list_(pa.bool_()))


class Rollout(Stage):
    """DRIFT's rollouts per shard (module doc): one row per record, lists over its K trajectories and, inside,
    their turns; `rollout_error` instead for a record that cannot be rolled out."""

    name = "rollout"
    libraries = MODEL_LIBRARIES + ("vllm",)
    reads = schema.columns(schema.RECORD)
    writes = pa.schema([("trajectories", pa.list_(schema.MESSAGES)), ("turn_correct", _bool_lists()),
                        ("turn_parseable", _bool_lists()), ("turn_answers", pa.list_(pa.list_(pa.string()))),
                        ("turn_score", pa.list_(pa.list_(pa.float64()))), ("rollout_error", pa.string())])

    cost_unit = "rollout"

    def cost(self, source: str) -> int | None:
        """Trajectories to sample: records x samples (None for the recorded verifier: nothing is generated)."""
        return None if self.config.recorded else shard_rows(source) * self.config.samples

    @property
    def runs_model(self) -> bool:
        """The recorded verifier replays the input's trajectory: no model, no GPU worker."""
        return not self.config.recorded

    def identity(self) -> dict:
        key = super().identity()
        if self.config.recorded:  # no model involved: one recorded trajectory per record
            key["config"] = {**key["config"], "generation": None, "samples": 1, "turns": 1}
        return key

    def run(self, shard: pa.Table) -> pa.Table:
        records = shard.to_pylist()
        rows = self._recorded(records) if self.config.recorded else self._generated(records)
        cols = {name: [r.get(name) for r in rows] for name in self.writes.names}
        return self.check(shard, pa.table(cols, schema=self.writes))

    def _problem(self, record: dict) -> str | None:
        need = verifiers.needs(self.config.verifier)
        if need and record.get(need) is None:
            return f"verifier {self.config.verifier} needs {need}, and the record has none"
        if not self.config.recorded and not chat.prompt_messages(record["messages"]):
            return "no prompt: the conversation starts with an assistant turn"
        if not self.config.recorded:
            return generation.template_problem(self.config.generation, self._prompt(record["messages"]),
                                               parse_tools(record.get("tools")))
        return None

    def _problem_of(self, record: dict) -> str | None:
        """`_problem`, or what the template or tokenizer raised on this record (its quarantine reason)."""
        try:
            return self._problem(record)
        except generation.NOT_RECORD_ERRORS:  # the machine's or the files', not this record's: stop the run
            raise
        except Exception as e:  # noqa: BLE001 - e.g. tools that are not JSON: this record's reason
            return chat.record_error(e)

    def _recorded(self, records: list[dict]) -> list[dict]:
        verify = verifiers.get("recorded", self.config.success_threshold)
        rows = []
        for rec in records:
            error = self._problem_of(rec)
            if error:
                rows.append({"rollout_error": error})
                continue
            v = verify(rec, rec["messages"][-1]["content"])
            rows.append({"trajectories": [rec["messages"]], "turn_correct": [[v.correct]],
                         "turn_parseable": [[v.parseable]], "turn_answers": [[v.answer]],
                         "turn_score": [[v.score]]})
        return rows

    def _generated(self, records: list[dict]) -> list[dict]:
        c = self.config
        verify = verifiers.get(c.verifier, c.success_threshold)
        rows = [{"rollout_error": self._problem_of(rec)} for rec in records]
        # one conversation per (valid record, sample); `owner` maps it back
        owner = [(r, k) for r, row in enumerate(rows) if row["rollout_error"] is None for k in range(c.samples)]
        convs = [self._prompt(records[r]["messages"]) for r, _ in owner]
        tools = [parse_tools(rec.get("tools")) if row["rollout_error"] is None else None
                 for rec, row in zip(records, rows)]
        verdicts: list[list[verifiers.Verdict]] = [[] for _ in owner]
        active = list(range(len(owner)))
        for turn in range(1, c.turns + 1):
            if turn > 1:
                active = self._still_rendered(active, owner, convs, tools, rows, turn)
            if not active:
                break
            seeds = [generation.row_seed(c.generation.seed, records[owner[i][0]]["id"], owner[i][1], turn)
                     for i in active]
            replies = generation.generate([convs[i] for i in active], c.generation, seeds=seeds,
                                          tools=[tools[owner[i][0]] for i in active])
            still = []
            for i, (reply,) in zip(active, replies):
                convs[i].append({"role": "assistant", "content": reply})
                v = verify(records[owner[i][0]], reply)
                verdicts[i].append(v)
                if not v.correct and turn < c.turns:
                    convs[i].append({"role": "user", "content": c.feedback})
                    still.append(i)
            active = still
        for r, row in enumerate(rows):
            if row["rollout_error"] is not None:
                continue
            mine = [i for i, (o, _) in enumerate(owner) if o == r]
            row.update({"trajectories": [convs[i] for i in mine],
                        "turn_correct": [[v.correct for v in verdicts[i]] for i in mine],
                        "turn_parseable": [[v.parseable for v in verdicts[i]] for i in mine],
                        "turn_answers": [[v.answer for v in verdicts[i]] for i in mine],
                        "turn_score": [[v.score for v in verdicts[i]] for i in mine]})
        return rows

    def _still_rendered(self, active: list[int], owner, convs, tools, rows, turn: int) -> list[int]:
        """The active conversations whose record the generator's template and tokenizer still take, now
        that they hold the policy's replies (a template may refuse one: GPT-OSS raises on a channel tag
        in a reply). A record refused on any of its conversations is quarantined with that reason and
        all its conversations stop; the others go on."""
        keep = []
        for i in active:
            r = owner[i][0]
            if rows[r]["rollout_error"] is None:
                problem = generation.template_problem(self.config.generation, convs[i], tools[r])
                if problem:
                    rows[r]["rollout_error"] = f"{problem} (turn {turn} of sample {owner[i][1]}, after the policy's replies)"
            if rows[r]["rollout_error"] is None:
                keep.append(i)
        return keep

    def _prompt(self, messages: list[dict]) -> list[dict]:
        prompt = [dict(m) for m in chat.prompt_messages(messages)]
        if self.config.system and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": self.config.system})
        return prompt
