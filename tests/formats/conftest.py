"""Fixtures for the adapter tests: where the real shared datasets live."""

from __future__ import annotations

from pathlib import Path

import pytest

# the real public datasets shipped with the tests (tests/data/real/*/SOURCE.md: origin, licence, fields)
SHARED_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "real"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return SHARED_DATA_DIR
