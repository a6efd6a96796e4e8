"""This process's place in a distributed run, for code below the training application (data
sharding, evaluation) that must not depend on Lightning."""

from __future__ import annotations

import torch


def dist_rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialised torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2 shard's) whole value as an ordinary tensor, gathered from every rank (a
    collective: every rank must call it); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
