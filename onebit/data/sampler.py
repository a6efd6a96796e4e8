"""A resumable, rank-aware sampler and loader for map-style data sets.

``EpochSampler`` draws a seeded permutation per epoch (the same on every rank), gives each rank its
strided share, and can start part-way through an epoch. ``ResumableDataLoader`` counts the batches
it has handed out and exposes ``state_dict``/``load_state_dict``: Lightning saves that state in
every checkpoint and restores it on resume, so a resumed run continues with the next unseen batch —
no sample repeated or skipped, whatever the number of workers (the count is kept in the main
process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from onebit.dist import dist_rank_world
from onebit.errors import OneBitInputError


def data_shape(loader: DataLoader) -> dict[str, int]:
    """What a saved data position counts in: sequences per batch and tokens per sequence
    (``seq_len`` of the data set, or of its blocks), for :func:`check_data_shape`."""
    shape = {"batch_size": int(loader.batch_size)}
    ds = loader.dataset
    seq_len = getattr(ds, "seq_len", None)
    if seq_len is None and getattr(ds, "blocks", None) is not None:
        seq_len = ds.blocks.shape[-1]
    if seq_len is not None:
        shape["seq_len"] = int(seq_len)
    return shape


def check_data_shape(state: dict[str, Any], loader: DataLoader) -> None:
    """Refuse to resume a data position saved with another batch size or sequence length: the
    position counts batches of blocks, so it would point at other tokens.

    Raises:
        OneBitInputError: naming the key and both values. (Positions saved before these keys
            were recorded are accepted.)
    """
    for key, now in data_shape(loader).items():
        saved = state.get(key)
        if saved is not None and int(saved) != now:
            raise OneBitInputError(
                f"the checkpoint's data position was saved with data.{key}={int(saved)}; resume "
                f"with the same value (now {now}), or start a new run to change it."
            )


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation (or order), strided over ranks, startable mid-epoch.

    Every rank gets ``len(data) // world_size`` indices (the remainder is dropped so ranks stay in
    step).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0
        self.start = 0  # indices of this rank's share already consumed in this epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        rank, world = dist_rank_world()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.size // world
        return order[rank : per_rank * world : world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.size // dist_rank_world()[1] - self.start


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose position survives a checkpoint."""

    def __init__(self, dataset, sampler: EpochSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, drop_last=True, **kwargs)
        self._batches = 0  # batches handed out in the current epoch
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        sampler: EpochSampler = self.sampler
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            self._batches = self._resume["batches"]
        else:
            self._batches = 0
        self._resume = None
        sampler.start = self._batches * self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def __len__(self) -> int:
        sampler: EpochSampler = self.sampler
        return (sampler.size // dist_rank_world()[1]) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches, **data_shape(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_data_shape(state, self)
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        self.sampler.set_epoch(int(state["epoch"]))
