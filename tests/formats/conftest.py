"""Fixtures for the adapter tests: where the real datasets shipped in tests/data/real live."""

from __future__ import annotations

from pathlib import Path

import pytest

# the real public datasets shipped with the tests (tests/data/real/*/SOURCE.md: origin, licence, fields)
REAL_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "real"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return REAL_DATA_DIR
