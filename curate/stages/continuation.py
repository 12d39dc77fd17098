"""Stage `continuation`: IRFT/SPIN's self-generated reply ỹ for each demonstration of one stage.

A demonstration's pair is built on its last assistant turn: the prompt is every message before it (for
a multi-turn chat, the whole history, tool calls and results included) and y is that turn, its tool
calls included; the record's tools are rendered into the prompt ỹ is sampled from. Records go to one of `stages` chunks
by a hash of their id, so the split does not depend on the order or size of the corpus, and only the
chunk of the stage being built is generated. Each record samples with its own seed (base seed, id):
its continuation does not depend on its shard or batch mates."""

from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa

from curate import chat, generation, schema
from curate.io.atomic import stable_hash
from curate.messages import compact, parse_tools
from curate.stages.base import MODEL_LIBRARIES, Stage, shard_rows


def stage_of(record_id: str, stages: int) -> int:
    """The IRFT stage (0 .. stages-1) of a record: the first 60 bits of its id's stable hash, mod `stages`."""
    return int(stable_hash(["irft-stage", record_id])[:15], 16) % stages


def demonstration(messages: list[dict]) -> tuple[list[dict], dict] | None:
    """(prompt, y): the messages before the last assistant turn, and that turn (compact message)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return None
    return messages[:last], compact(messages[last])


class Continuation(Stage):
    """IRFT's generation per shard: the prompt, y and the generator's reply ỹ of each record of the stage
    being built; the rest carry their `stage` only, and `pair_error` with the reason for a record that
    cannot be paired."""

    name = "continuation"
    libraries = MODEL_LIBRARIES + ("vllm",)
    runs_model = True
    reads = ("id", "messages", "tools")
    writes = pa.schema([("stage", pa.int32()), ("prompt", schema.MESSAGES), ("chosen", schema.MESSAGES),
                        ("chosen_text", pa.string()), ("rejected_text", pa.string()), ("tools", pa.string()),
                        ("pair_error", pa.string())])

    cost_unit = "record"

    def cost(self, source: str) -> int:
        """Records whose reply may be generated."""
        return shard_rows(source)

    def describe(self) -> dict:
        return {"generation": asdict(self.config.generation)}

    def run(self, shard: pa.Table) -> pa.Table:
        c = self.config
        ids = shard.column("id").to_pylist()
        rows = {k: [None] * len(ids) for k in self.writes.names}
        todo = []
        tools = shard.column("tools").to_pylist()
        for i, (rid, messages) in enumerate(zip(ids, shard.column("messages").to_pylist())):
            rows["stage"][i] = stage_of(rid, c.stages)
            demo = demonstration(messages)
            if demo is None:
                rows["pair_error"][i] = "no assistant turn after a prompt"
            elif rows["stage"][i] == c.stage:
                prompt, turn = demo
                try:
                    refused = generation.template_problem(c.generation, prompt, parse_tools(tools[i]), turn)
                    chosen_text = None if refused else chat.turn_text(turn)
                except generation.NOT_RECORD_ERRORS:  # the machine's or the files', not this record's
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. tools or a call that is not JSON: this record's
                    refused = chat.record_error(e)
                if refused:
                    rows["pair_error"][i] = refused
                    continue
                rows["prompt"][i] = prompt
                rows["chosen"][i], rows["chosen_text"][i], rows["tools"][i] = [turn], chosen_text, tools[i]
                todo.append(i)
        seeds = [generation.row_seed(c.generation.seed, ids[i]) for i in todo]
        replies = generation.generate([rows["prompt"][i] for i in todo], c.generation, n=1, seeds=seeds,
                                      tools=[parse_tools(tools[i]) for i in todo])
        for i, (reply,) in zip(todo, replies):
            rows["rejected_text"][i] = reply
        return self.check(shard, pa.table(rows, schema=self.writes))
