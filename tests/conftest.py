"""Shared test helpers: where ../shared lives, and the official goldens."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "openai"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"official goldens not found at {FIXTURES} (expected ../shared beside the project root)")
    return FIXTURES
