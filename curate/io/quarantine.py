"""Quarantine rows and the count rule every job ends with: nothing is dropped silently.

A quarantine row is {source, source_index, stage, reason, raw}: the record's file and 0-based line/row,
the stage that rejected it, why, and its text (at most RAW_LIMIT characters)."""

from __future__ import annotations

import json

import pyarrow as pa

from curate.messages import compact_all

RAW_LIMIT = 64 * 1024  # characters of a bad record's text a quarantine row keeps


def quarantine_row(record: dict, stage: str, reason: str) -> dict:
    """The quarantine row of a canonical record rejected at `stage`: its messages and tools as raw text."""
    raw = json.dumps({"messages": compact_all(record["messages"]), "tools": record.get("tools")}, ensure_ascii=False)
    return {"source": record["source"], "source_index": record["source_index"], "stage": stage, "reason": reason,
            "raw": raw[:RAW_LIMIT]}


def quarantine_rows(records: pa.Table, stage: str, reasons: list[str] | str) -> list[dict]:
    """Quarantine rows of `records` at `stage`, one reason each (or one for all)."""
    return [quarantine_row(rec, stage, reasons if isinstance(reasons, str) else reasons[i])
            for i, rec in enumerate(records.to_pylist())]


def reconcile(counts: dict, *parts: str) -> None:
    """counts["input"] == the sum of counts[p] over `parts`, or RuntimeError: a record was lost (or made)."""
    if counts["input"] != sum(counts[p] for p in parts):
        raise RuntimeError(f"counts do not reconcile, a record was lost: input {counts['input']} != "
                           f"{' + '.join(parts)} in {counts}")
