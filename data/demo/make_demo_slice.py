"""Regenerate the demo slice in data/demo/ from the shared datasets, deterministically.

    python data/demo/make_demo_slice.py [--shared ../shared/data]

Selection rules (also in SOURCE.md):
- alfworld_knowagent.jsonl: from KnowAgent's D0 file, the 20 successful (`result` true) and the 20 failed
  records with the shortest `traj` (ties: earlier line first), written as the original lines, in source order.
- gsm8k_prompt_completion.jsonl: the first 40 GSM8K train records as {"prompt": question, "completion": answer}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parents[2] / "shared" / "data"
KNOWAGENT = "alfworld_knowagent_trajs/KnowAgentALFWorld_llama-2-13b_D0.even_tasks.jsonl"
GSM8K = "gsm8k/train.lines1-2000.jsonl"
PER_OUTCOME = 20
GSM8K_COUNT = 40


def shortest_by_outcome(lines: list[bytes], per_outcome: int) -> list[bytes]:
    """The `per_outcome` shortest-`traj` lines of each outcome, kept in source order."""
    records = [json.loads(line) for line in lines]
    keep: set[int] = set()
    for outcome in (True, False):
        ids = [i for i, r in enumerate(records) if bool(r["result"]) is outcome]
        ids.sort(key=lambda i: (len(records[i]["traj"]), i))
        if len(ids) < per_outcome:
            raise SystemExit(f"{KNOWAGENT}: only {len(ids)} records with result={outcome}")
        keep.update(ids[:per_outcome])
    return [lines[i] for i in sorted(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared/data folder")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the two files")
    args = parser.parse_args()

    # Byte-for-byte copies of whole source lines: split on b"\n" only, keep each line's own bytes.
    source = (args.shared / KNOWAGENT).read_bytes().split(b"\n")
    kept = shortest_by_outcome([line for line in source if line.strip()], PER_OUTCOME)
    (args.out / "alfworld_knowagent.jsonl").write_bytes(b"".join(line + b"\n" for line in kept))

    with open(args.shared / GSM8K, encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(GSM8K_COUNT)]
    with open(args.out / "gsm8k_prompt_completion.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"prompt": row["question"], "completion": row["answer"]}, ensure_ascii=False) + "\n")
    print(f"wrote {len(kept)} + {len(rows)} records to {args.out}")


if __name__ == "__main__":
    main()
