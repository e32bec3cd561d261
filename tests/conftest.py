"""Shared test helpers: where ../shared lives, and the official goldens."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One intra-op thread for the whole run: the tests use tiny tensors, for which extra threads only
    add overhead, and on a busy 2-core machine their spinning made tests up to 10x slower."""
    import torch

    torch.set_num_threads(1)

SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "openai"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"official goldens not found at {FIXTURES} (expected ../shared beside the project root)")
    return FIXTURES


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: for tiny tensors extra threads only add overhead, and on a
    busy 2-core machine their spinning made the network tests 10x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
