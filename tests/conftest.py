"""Shared test fixtures: the golden reference folder beside the checkout."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden_utils import GOLDEN_DIR


@pytest.fixture(scope="session")
def golden() -> Path:
    """Path to ../shared/golden; skips (with the reason) when the folder is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR} (CI keeps ../shared beside the checkout)")
    return GOLDEN_DIR
