"""Shared fixtures: tiny random models (offline) and the real data in ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def compose_config(config_name: str, overrides: list[str], tmp: Path | None = None):
    """``conf/<config_name>.yaml`` with ``overrides``, as Hydra composes it; with ``tmp``, every
    path of the run points into it, so nothing touches the repository."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from onebit.config_utils import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    if tmp is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(REPO)
            cfg.paths.output_dir = str(tmp / "out")
            cfg.paths.log_dir = str(tmp / "logs")
            cfg.paths.cache_dir = str(tmp / "cache")
    return cfg


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
