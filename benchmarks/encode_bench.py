"""Encoding time of one long record: `curate.chat.encode` (chat template, assistant spans, loss mask)
on a conversation of N turns, with the embedded SmolLM2 tokenizer and its ChatML template.

    python benchmarks/encode_bench.py [--turns 200 400 800 1600 3200] [--whole] [--repeat 3]

Prints one JSON object on stdout. A record of N turns is N messages, alternating user and assistant,
short texts ("question i?", "answer i."). Per N: the median wall time of `--repeat` encodes (seconds),
how many times the template was rendered and how many messages those renders held in all (both grow
linearly with N when the turns are located in windows, quadratically when each is located in the
whole conversation), the token count and the target count (which do not depend on the method).

`--whole` also times the same records with every turn located in the whole conversation (what encode
did before windows: the conversation rendered up to each turn), for the before/after comparison, and
checks that both give the same ids and mask. benchmarks/results/encode_cpu.json is one run of
`--whole` on a shared 2-core machine (1,600 turns: 0.39 s, against 10.4 s the whole-conversation way).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate import chat, models  # noqa: E402
from curate.chat import spans, templates  # noqa: E402


def record(turns: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}?"} if i % 2 == 0 else
            {"role": "assistant", "content": f"answer {i}."} for i in range(turns)]


def measure(tok, messages: list[dict], repeat: int, whole: bool) -> dict:
    """Median seconds of `repeat` encodes, and the renders of one (count, messages rendered)."""
    renders = {"calls": 0, "messages": 0}
    real = templates.render_template

    def counting(tokenizer, template, msgs, tools, generation_prompt=False):
        renders["calls"] += 1
        renders["messages"] += len(msgs)
        return real(tokenizer, template, msgs, tools, generation_prompt)

    window_from = 1 << 60 if whole else spans.WINDOW_FROM
    with mock.patch.object(spans, "WINDOW_FROM", window_from):
        with mock.patch.object(spans, "render_template", counting):
            enc = chat.encode(tok, messages)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            chat.encode(tok, messages)
            times.append(time.perf_counter() - t)
    return {"seconds": round(statistics.median(times), 3), "renders": renders["calls"],
            "messages_rendered": renders["messages"], "tokens": len(enc.input_ids),
            "targets": enc.n_loss_tokens, "_enc": enc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, nargs="+", default=[200, 400, 800, 1600, 3200])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--whole", action="store_true", help="also time locating every turn in the whole conversation")
    args = ap.parse_args(argv)
    tok = models.load_tokenizer(models.resolve(None))
    rows = []
    for n in args.turns:
        messages = record(n)
        row = {"turns": n, **measure(tok, messages, args.repeat, whole=False)}
        if args.whole:
            before = measure(tok, messages, 1, whole=True)
            same = (before["_enc"].input_ids, before["_enc"].loss_mask) == (row["_enc"].input_ids, row["_enc"].loss_mask)
            row["whole"] = {k: v for k, v in before.items() if k != "_enc"} | {"same_ids_and_mask": same}
        del row["_enc"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "encode", "tokenizer": "embedded SmolLM2 (ChatML)", "python": platform.python_version(),
                      "machine": platform.machine(), "window_from": spans.WINDOW_FROM, "block": spans.BLOCK,
                      "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
