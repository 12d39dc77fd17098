"""Fixtures for the adapter tests: where the real shared datasets live."""

from __future__ import annotations

from pathlib import Path

import pytest

# /work/main/tests/formats/conftest.py -> /work/shared/data (the repo's sibling "shared" folder)
SHARED_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA_DIR} (the repo's ../shared/data)")
    return SHARED_DATA_DIR
