"""The two ways reading input fails: a whole file that cannot be read (`UnreadableFile`, raised) and one
record that cannot be parsed (`RawError`, yielded in its place for ingest to quarantine).

A module of their own so that listing (curate.io.listing), line parsing (curate.io.jsonline) and reading
(curate.io.readers, which re-exports both) share them without importing one another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class UnreadableFile(Exception):
    """A whole input file cannot be read; the message starts with the file path."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"{path}: {why}")
        self.path = str(path)
        self.why = why


@dataclass(frozen=True)
class RawError:
    """A record that could not even be parsed (bad JSON, bad UTF-8, not an object)."""

    reason: str
    raw: str
