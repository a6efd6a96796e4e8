"""A DataLoader over a sharded token stream whose data position survives a checkpoint.

The position is exact and cheap to record: how many blocks each worker has handed to the training
loop in the current pass, which worker comes next, and the pass number. Every batch is tagged in its
worker with the worker's id, so the counts are right even when a finite stream's workers run out at
different times. On resume each worker re-reads its shard and skips its count, and the workers are
renumbered so that the DataLoader's round-robin starts at the worker that comes next: no block is
repeated or lost, and nothing about the tokenizer or the source has to be serialisable.

Lightning (2.6) saves ``state_dict()`` of every train dataloader that has ``state_dict`` and
``load_state_dict`` (``CombinedLoader._state_dicts``) and restores it before iterating again. Two
details need care, both handled here and in :class:`~onebit.data.text.TextDataModule`:

* Lightning fetches one batch ahead of the training step when the loader has no length, so at save
  time the loader has handed out one batch more than the loop has used. ``consumed_batches`` lets
  the owner report what the loop has really used, and ``state_dict`` returns the position after
  exactly that many batches (the last few positions are remembered).
* The position is the same on every rank for an infinite stream (ranks take batches in lock-step and
  workers are read round-robin), and Lightning stores rank 0's, so it is stored per worker, not
  per shard; resuming needs the same ``num_workers`` and world size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from onebit.data.sampler import check_data_shape, data_shape
from onebit.errors import OneBitInputError

_WORKER_KEY = "_worker"
_HISTORY = 16  # positions remembered for the consumed-batches lookup; Lightning looks 1 ahead


class ResumableStream(Protocol):
    """What the loader needs from its dataset: where to start the next iteration."""

    world_size: int

    def resume_from(self, epoch: int, skip_blocks: Sequence[int], first_worker: int = 0) -> None:
        """Next iteration: pass ``epoch``; worker ``i`` of the DataLoader plays logical worker
        ``(i + first_worker) % num_workers`` and skips ``skip_blocks[logical]`` blocks."""


@dataclass(frozen=True)
class StreamPosition:
    """Where the consumer is: pass ``epoch``, ``batches`` handed out in it, ``blocks`` per (logical)
    worker, and ``next_worker``, the logical worker whose batch comes next in the round-robin."""

    epoch: int
    batches: int
    blocks: tuple[int, ...]
    next_worker: int = 0


def collate_blocks(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack examples of equal length into a batch.

    Shapes: each example {"input_ids": (seq_len,), "attention_mask": (seq_len,)} →
    {"input_ids": (batch, seq_len), "attention_mask": (batch, seq_len)}.
    """
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def _collate_tagged(examples: list[dict[str, Tensor]]) -> dict[str, Any]:
    # Runs in the worker: the tag tells the main process which worker's count to advance.
    batch: dict[str, Any] = collate_blocks(examples)
    info = get_worker_info()
    batch[_WORKER_KEY] = 0 if info is None else info.id
    return batch


class ResumableStreamLoader(DataLoader):
    """DataLoader over a :class:`ResumableStream` (an ``IterableDataset``) with a saved position.

    A new iterator continues after the last batch handed out (or from a loaded state); when a finite
    stream ends, the position moves to the start of the next pass. ``persistent_workers`` is not
    supported (a worker must be restarted to start at a new position).

    Shapes: yields {"input_ids": (batch, seq_len), "attention_mask": (batch, seq_len)}.

    Attributes:
        consumed_batches: optional callable giving how many batches of the current pass the consumer
            has really used (``None`` when unknown); see the module docstring.
    """

    def __init__(
        self, dataset: IterableDataset, batch_size: int, num_workers: int = 0, **kwargs: Any
    ) -> None:
        if not isinstance(dataset, IterableDataset) or not hasattr(dataset, "resume_from"):
            raise TypeError("ResumableStreamLoader needs an IterableDataset with resume_from().")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise OneBitInputError(f"batch_size={batch_size!r} must be an integer >= 1.")
        if kwargs.get("persistent_workers"):
            raise OneBitInputError("ResumableStreamLoader does not support persistent_workers.")
        if "collate_fn" in kwargs:  # ours tags each batch with its worker
            raise TypeError("ResumableStreamLoader sets its own collate_fn.")
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate_tagged,
            **kwargs,
        )
        self.consumed_batches: Callable[[], int | None] | None = None
        self._position = StreamPosition(0, 0, (0,) * self._slots, 0)
        self._history: dict[int, StreamPosition] = {0: self._position}
        self._pass_end: int | None = None  # batches of the pass that just ended
        self._generation = 0  # bumped by load_state_dict so a live iterator restarts
        self._live = False

    @property
    def _slots(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self._iterate()

    def _iterate(self) -> Iterator[dict[str, Tensor]]:
        while True:
            finished = yield from self._one_pass()
            if finished:
                return

    def _one_pass(self) -> Iterator[dict[str, Tensor]]:
        """One pass from the current position; returns False when a loaded state interrupts it."""
        generation, start = self._generation, self._position
        self._history, self._pass_end = {start.batches: start}, None
        self.dataset.resume_from(start.epoch, start.blocks, start.next_worker)
        blocks, batches, slots = list(start.blocks), start.batches, self._slots
        it = super().__iter__()  # workers copy the dataset, with its resume point, here
        self._live = True
        try:
            while True:
                if self._generation != generation:
                    return False
                try:
                    batch = next(it)
                except StopIteration:
                    break
                worker = (batch.pop(_WORKER_KEY) + start.next_worker) % slots  # logical id
                blocks[worker] += batch["input_ids"].shape[0]
                batches += 1
                self._position = StreamPosition(
                    start.epoch, batches, tuple(blocks), (worker + 1) % slots
                )
                self._remember(self._position)
                yield batch
        finally:
            self._live = False
            del it  # shuts down the workers
        if self._generation != generation:
            return False
        self._pass_end = batches
        self._position = StreamPosition(start.epoch + 1, 0, (0,) * self._slots, 0)
        return True

    def _remember(self, position: StreamPosition) -> None:
        self._history[position.batches] = position
        if len(self._history) > _HISTORY:
            del self._history[next(iter(self._history))]

    def _consumed_position(self) -> StreamPosition:
        position = self._position
        consumed = self.consumed_batches() if self.consumed_batches is not None else None
        if consumed is None or consumed == position.batches:
            return position
        if self._pass_end is not None and consumed == self._pass_end:
            return position  # the pass ended and all of it was used: start of the next pass
        if consumed in self._history:
            return self._history[consumed]
        warnings.warn(
            f"The training loop reports {consumed} batches used but the data loader has handed out "
            f"{position.batches}; saving the loader's own position (a resume may skip batches).",
            stacklevel=2,
        )
        return position

    def state_dict(self) -> dict[str, Any]:
        """The data position after the batches the consumer has used (see ``consumed_batches``)."""
        position = self._consumed_position()
        return {
            "epoch": position.epoch,
            "batches": position.batches,
            "blocks": list(position.blocks),
            "next_worker": position.next_worker,
            "num_workers": self.num_workers,
            "world_size": int(getattr(self.dataset, "world_size", 1)),
            **data_shape(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`) at the next iteration.

        Raises:
            OneBitInputError: when the state was saved with another ``num_workers`` or world size,
                which shard the documents differently.
        """
        check_data_shape(state, self)
        workers, world = int(state["num_workers"]), int(state["world_size"])
        if workers != self.num_workers:
            raise OneBitInputError(
                f"The checkpoint's data position was saved with data.num_workers={workers}; resume "
                f"with the same value (now {self.num_workers}) to continue the stream exactly."
            )
        own_world = int(getattr(self.dataset, "world_size", 1))
        if world != own_world:
            raise OneBitInputError(
                f"The checkpoint's data position was saved on {world} rank(s); resume on the same "
                f"number (now {own_world}) to continue the stream exactly."
            )
        blocks, next_worker = tuple(int(b) for b in state["blocks"]), int(state["next_worker"])
        if len(blocks) != self._slots or not 0 <= next_worker < self._slots:
            raise OneBitInputError(
                f"Malformed data position {state!r}: one count per worker needed."
            )
        if self._live:
            # Lightning issue #20550: the loop started iterating before the checkpoint was read.
            warnings.warn(
                "The data position from the checkpoint arrived after the train dataloader had "
                "started; the batch(es) already fetched are used once before the stream "
                "continues from the checkpoint (compute the schedule length from "
                "trainer.max_steps instead of trainer.estimated_stepping_batches to avoid this).",
                stacklevel=2,
            )
        self._position = StreamPosition(
            int(state["epoch"]), int(state["batches"]), blocks, next_worker
        )
        self._history, self._pass_end = {self._position.batches: self._position}, None
        self._generation += 1
