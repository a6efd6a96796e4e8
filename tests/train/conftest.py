"""Compose the real train config (as Hydra would) and shrink it for CPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from ..conftest import compose_config


def compose_train(overrides: list[str], tmp: Path | None = None) -> DictConfig:
    """The train config with ``overrides``; paths point into ``tmp`` so nothing touches the repo."""
    return compose_config("train", overrides, tmp)


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
    "optim.scale_lr=1.0",  # g, h and gains at lr too: 10x lr is tuned for real models
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
