"""Compose the real train config (as Hydra would) and shrink it for CPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from ..conftest import REPO


def compose_train(overrides: list[str], tmp: Path | None = None) -> DictConfig:
    """The train config with ``overrides``; paths point into ``tmp`` so nothing touches the repo."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if tmp is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(REPO)
            cfg.paths.output_dir = str(tmp / "out")
            cfg.paths.log_dir = str(tmp / "logs")
            cfg.paths.cache_dir = str(tmp / "cache")
    return cfg


TINY = [
    "model=tiny_llama",
    "trainer=cpu_smoke",
    "logger=csv",
    "data.num_sequences=24",
    "data.val_sequences=4",
    "data.seq_len=16",
    "data.batch_size=2",
    "data.gen_batch_size=8",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
