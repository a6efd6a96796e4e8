"""Shared fixtures: tiny random models (offline) and the real data in ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data/models live in ../shared beside the checkout)")
    return path


@pytest.fixture
def stories_path() -> Path:
    return shared_path("models", "stories260K-hf")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
