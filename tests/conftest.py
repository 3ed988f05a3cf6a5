"""Shared pytest fixtures (other test modules may append theirs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (real CIFAR-10, pretrained ResNets); skips the test when absent.

    Tests using it should also carry ``@pytest.mark.shared``.
    """
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent")
    return SHARED_DATA
