"""Text data: C4/WikiText (Hub) or local files, tokenised on the fly and packed into blocks.

Each document is tokenised without special tokens and followed by the tokenizer's EOS (when it has
one); the token stream is cut into non-overlapping blocks of ``seq_len`` and the tail is dropped::

    doc₀ EOS doc₁ EOS doc₂ EOS ...  →  [block₀][block₁][block₂]...  (seq_len tokens each)

Training reads a stream sharded over ranks *and* DataLoader workers (document ``i`` goes to shard
``i % (world_size · num_workers)``, shard ``rank · num_workers + worker``) and packs each shard on
its own; it is infinite by default (the source is read again, pass after pass) and its position is
saved in checkpoints (:mod:`onebit.data.stream`). Validation is a fixed set of blocks, materialised
once in ``setup``: the first ``val_blocks`` blocks of the validation split (Hub, or ``val_path``)
or, for local files without ``val_path``, of the last documents of ``path``, which are then left
out of training.
"""

from __future__ import annotations

import random
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from onebit.config_utils import check_int
from onebit.data.sources import (
    SAMPLE_BY,
    HubDocuments,
    LocalDocuments,
    check_hub,
    check_local_files,
    resolve_local_files,
)
from onebit.data.stream import ResumableStreamLoader, collate_blocks
from onebit.dist import dist_rank_world
from onebit.errors import OneBitInputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    TokenizerLike = PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase]

SOURCES = ("local", "hub")


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one document followed by EOS (when the tokenizer has one); no BOS."""
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def pack_blocks(token_docs: Iterable[Sequence[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token sequences and cut them into blocks of ``seq_len``; the tail is dropped.

    Shapes: token_docs: sequences of any length → blocks: lists of exactly ``seq_len`` ids.
    """
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        start = 0
        while len(buf) - start >= seq_len:
            yield buf[start : start + seq_len]
            start += seq_len
        del buf[:start]


class PackedTextDataset(IterableDataset):
    """Packed blocks of one shard of a document stream, sharded over ranks and workers.

    Args:
        documents: zero-argument callable returning a fresh iterable of documents (picklable for
            spawned workers, e.g. :class:`~onebit.data.sources.LocalDocuments`).
        tokenizer: a Hugging Face tokenizer.
        seq_len: tokens per block.
        infinite: read the source again after each pass (the pass number seeds ``shuffle_docs``).
        rank, world_size: this process's place among the data-parallel ranks (default:
            ``torch.distributed`` when initialised, else 0 and 1).
        shuffle_docs: shuffle documents within consecutive windows of this many (0 or 1: source
            order); the same seeded order on every shard, so shards stay disjoint.
        seed: seed of that shuffle.
        name: the data set's name, for messages.

    Shapes: yields {"input_ids": (seq_len,) int64, "attention_mask": (seq_len,) int64 of ones}.
    """

    def __init__(
        self,
        documents: Callable[[], Iterable[str]],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        *,
        infinite: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_docs: int = 0,
        seed: int = 0,
        name: str = "text",
    ) -> None:
        check_int("data", "seq_len", seq_len, 1)
        check_int("data", "shuffle_docs", shuffle_docs, 0)
        if rank is None or world_size is None:
            rank, world_size = dist_rank_world()
        if not 0 <= rank < world_size:
            raise OneBitInputError(f"rank={rank} is not in [0, world_size={world_size}).")
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.infinite, self.rank, self.world_size = infinite, rank, world_size
        self.shuffle_docs, self.seed, self.name = shuffle_docs, seed, name
        self._start_epoch, self._first_worker = 0, 0
        self._skip_blocks: tuple[int, ...] = ()

    def resume_from(self, epoch: int, skip_blocks: Sequence[int], first_worker: int = 0) -> None:
        """Start the next iteration at pass ``epoch``; DataLoader worker ``i`` plays logical worker
        ``w = (i + first_worker) % num_workers`` and skips the first ``skip_blocks[w]`` blocks."""
        self._start_epoch, self._first_worker = int(epoch), int(first_worker)
        self._skip_blocks = tuple(int(b) for b in skip_blocks)

    def ordered_documents(self, epoch: int = 0) -> Iterator[str]:
        """All documents of pass ``epoch`` in stream order (the same on every shard)."""
        docs = iter(self.documents())
        if self.shuffle_docs <= 1:
            yield from docs
            return
        rng = random.Random(f"{self.seed}:{epoch}")
        while window := list(islice(docs, self.shuffle_docs)):
            rng.shuffle(window)
            yield from window

    def shard_documents(self, shard: int, num_shards: int, epoch: int = 0) -> Iterator[str]:
        """The documents of pass ``epoch`` whose index ``i`` has ``i % num_shards == shard``."""
        for i, doc in enumerate(self.ordered_documents(epoch)):
            if i % num_shards == shard:
                yield doc

    def _token_docs(self, shard: int, num_shards: int) -> Iterator[list[int]]:
        epoch = self._start_epoch
        while True:
            count = 0
            for doc in self.shard_documents(shard, num_shards, epoch):
                count += 1
                yield encode_document(self.tokenizer, doc)
            if not self.infinite:
                return
            if count == 0:  # looping again would spin forever without yielding
                raise OneBitInputError(
                    f"Shard {shard} of {num_shards} (world_size x num_workers) got no document of "
                    f"data set {self.name!r}; use fewer data.num_workers or ranks, or more data."
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (worker + self._first_worker) % workers
        shard, num_shards = self.rank * workers + worker, self.world_size * workers
        skip = self._skip_blocks[worker] if worker < len(self._skip_blocks) else 0
        blocks = pack_blocks(self._token_docs(shard, num_shards), self.seq_len)
        for ids in islice(blocks, skip, None):
            t = torch.tensor(ids, dtype=torch.long)
            yield {"input_ids": t, "attention_mask": torch.ones_like(t)}


class BlockDataset(IterableDataset):
    """Fixed, materialised blocks (validation), already this rank's share.

    Iterable and without ``__len__`` so that Lightning neither adds a distributed sampler (which
    would shard a second time) nor warns about the length of an iterable.

    Shapes: blocks (n, seq_len) int64 →
    yields {"input_ids": (seq_len,), "attention_mask": (seq_len,)}.
    """

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for ids in self.blocks[worker::workers]:
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TextDataModule(L.LightningDataModule):
    """Packed text blocks from C4/WikiText on the Hub or from local files (see module docstring).

    Args:
        name: the data set's name, for messages (``c4``, ``wikitext``).
        source: ``hub`` (stream ``hub_name``) or ``local`` (files at ``path``).
        path: local file, directory or glob (``.txt``/``.raw``, ``.jsonl``/``.json`` optionally
            gzipped, ``.parquet``); several files are read in sorted order.
        val_path: local validation files; without it validation is the held-out tail of ``path``
            (which reads all of ``path`` once in ``setup``: set it for a large local corpus).
        hub_name, hub_config: the Hub data set, e.g. ``allenai/c4`` and ``en``.
        train_split, val_split: Hub splits.
        text_field: JSON field / parquet column / Hub column holding the text.
        sample_by: how rows become documents (:mod:`onebit.data.sources`): ``auto``, ``row``,
            ``paragraph`` or ``article`` (WikiText headings).
        seq_len: tokens per block.
        calibration_seq_len: tokens per calibration sequence (``quant.sign_init``,
            ``quant.gain_init``), cut from the same text; None: ``seq_len``. Calibrating at the
            evaluation's length (2048) while training on shorter blocks lowered SmolLM2's
            WikiText-2 perplexity by 28 % at 30 steps (docs/levers_smollm2_135m.md).
        batch_size, val_batch_size: blocks per batch (``val_batch_size``: ``batch_size`` if None).
        num_workers: DataLoader workers of the training stream (validation is in memory).
        val_blocks: validation blocks (0: no validation); with several ranks it is rounded up to a
            multiple of the world size so that every rank runs the same number of batches.
        infinite: training reads the source again after each pass (use ``trainer.max_steps``);
            ``false`` makes one pass one epoch (keep it for a single rank: shards differ in length).
        shuffle_docs: shuffle training documents within windows of this many (0: source order).
        seed: seed of that shuffle.
        tokenizer: a ``PreTrainedTokenizerBase`` or a zero-argument callable returning one,
            resolved in ``setup`` (``train.py`` sets it from the model).
        hub_timeout_s: how long the Hub connectivity probe may take.
    """

    def __init__(
        self,
        name: str = "text",
        source: str = "local",
        path: str | None = None,
        val_path: str | None = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        text_field: str = "text",
        sample_by: str = "auto",
        seq_len: int = 2048,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        val_blocks: int = 64,
        infinite: bool = True,
        shuffle_docs: int = 0,
        seed: int = 0,
        tokenizer: TokenizerLike | None = None,
        hub_timeout_s: float = 3.0,
        calibration_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise OneBitInputError(f"data.source={source!r} is not one of {', '.join(SOURCES)}.")
        if sample_by not in SAMPLE_BY:
            raise OneBitInputError(
                f"data.sample_by={sample_by!r} is not one of {', '.join(SAMPLE_BY)}."
            )
        if source == "local" and not path:
            raise OneBitInputError("data.path must name local files when data.source=local.")
        if source == "hub" and not hub_name:
            raise OneBitInputError("data.hub_name must name a Hub data set when data.source=hub.")
        for key, value, low in [
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_blocks", val_blocks, 0),
            ("shuffle_docs", shuffle_docs, 0),
        ]:
            check_int("data", key, value, low)
        if val_batch_size is not None:
            check_int("data", "val_batch_size", val_batch_size, 1)
        if calibration_seq_len is not None:
            check_int("data", "calibration_seq_len", calibration_seq_len, 1)
        self.calibration_seq_len = calibration_seq_len
        self.name, self.source, self.path, self.val_path = name, source, path, val_path
        self.hub_name, self.hub_config = hub_name, hub_config
        self.train_split, self.val_split = train_split, val_split
        self.text_field, self.sample_by = text_field, sample_by
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.val_blocks, self.infinite = num_workers, val_blocks, infinite
        self.shuffle_docs, self.seed, self.hub_timeout_s = shuffle_docs, seed, hub_timeout_s
        self.tokenizer = tokenizer
        self._tok: PreTrainedTokenizerBase | None = None
        self._sources: tuple[Callable[[], Iterator[str]], Callable[[], Iterator[str]] | None] | None
        self._sources = None
        self._train_set: PackedTextDataset | None = None
        self._val: Tensor | None = None
        self._train_loader: ResumableStreamLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        tok = self._resolve_tokenizer()
        if stage in (None, "fit", "validate") and self._val is None:
            self._val = self._materialise_val(tok)
        if stage in (None, "fit") and self._train_set is None:
            rank, world = self._rank_world()
            self._train_set = PackedTextDataset(
                self._split_sources(tok)[0],
                tok,
                self.seq_len,
                infinite=self.infinite,
                rank=rank,
                world_size=world,
                shuffle_docs=self.shuffle_docs,
                seed=self.seed,
                name=self.name,
            )

    def preflight(self, world_size: int = 1) -> None:
        """Fail on bad data input before any model is loaded: no tokenizer, a Hub data set
        offline, local files missing, empty, shorter than one block of ``seq_len``, not UTF-8
        anywhere in them (every byte is read), or a parquet column that is not text."""
        tok = self._resolve_tokenizer()
        if self.source == "hub":
            check_hub(self.hub_name, self.hub_config, self.train_split, self.hub_timeout_s)
            return
        check_local_files(resolve_local_files(self.path), self.text_field)
        if self.val_path:
            check_local_files(resolve_local_files(self.val_path), self.text_field)
        docs = LocalDocuments(self.path, text_field=self.text_field, sample_by=self.sample_by)
        self._check_one_block(docs, tok)

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tok is None:
            tok = self.tokenizer
            if tok is not None and not hasattr(tok, "convert_tokens_to_ids") and callable(tok):
                tok = tok()
            if tok is None:
                raise OneBitInputError(
                    f"Data set {self.name!r} needs a tokenizer (TextDataModule(tokenizer=...)); "
                    "the model has none (tiny random models: use data=self_generated)."
                )
            self._tok = tok
        return self._tok

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return dist_rank_world()

    def _what(self, source: Any) -> str:
        return f"data set {self.name!r} ({source.describe()})"

    def _split_sources(
        self, tok: PreTrainedTokenizerBase
    ) -> tuple[Callable[[], Iterator[str]], Callable[[], Iterator[str]] | None]:
        """(train documents, validation documents or None), holding out a local tail if needed."""
        if self._sources is not None:
            return self._sources
        if self.source == "hub":
            check_hub(self.hub_name, self.hub_config, self.train_split, self.hub_timeout_s)
            kw = dict(
                config=self.hub_config,
                text_field=self.text_field,
                sample_by=self.sample_by,
                timeout_s=self.hub_timeout_s,
            )
            train = HubDocuments(self.hub_name, split=self.train_split, **kw)
            val = (
                HubDocuments(self.hub_name, split=self.val_split, **kw) if self.val_blocks else None
            )
        elif self.val_path or not self.val_blocks:
            kw = dict(text_field=self.text_field, sample_by=self.sample_by)
            train = LocalDocuments(self.path, **kw)
            val = LocalDocuments(self.val_path, **kw) if self.val_blocks else None
            resolve_local_files(self.path)  # a missing path fails here, naming it
            self._check_one_block(train, tok)
        else:
            whole = LocalDocuments(self.path, text_field=self.text_field, sample_by=self.sample_by)
            n_docs, held_out = self._tail_holdout(whole, tok)
            kw = dict(text_field=self.text_field, sample_by=self.sample_by)
            train = LocalDocuments(self.path, stop=n_docs - held_out, **kw)
            val = LocalDocuments(self.path, start=n_docs - held_out, **kw)
            self._check_one_block(train, tok)
            shards = self._rank_world()[1] * max(1, self.num_workers)
            if n_docs - held_out < shards:
                raise OneBitInputError(
                    f"{self._what(train)} has {n_docs - held_out} training documents, fewer than "
                    f"the {shards} shards (world_size x num_workers); lower data.num_workers."
                )
        self._sources = (train, val)
        return self._sources

    def _val_count(self) -> int:
        world = self._rank_world()[1]
        return -(-self.val_blocks // world) * world  # every rank gets the same number of blocks

    def _tail_holdout(self, whole: LocalDocuments, tok: PreTrainedTokenizerBase) -> tuple[int, int]:
        """(documents in ``whole``, how many of the last ones hold ``_val_count()`` blocks)."""
        need = self._val_count() * self.seq_len
        keep = 64
        while True:
            # One read pass (no tokenising) keeps the last `keep` documents; widen until enough.
            tail: deque[str] = deque(maxlen=keep)
            n_docs = 0
            for doc in whole():
                tail.append(doc)
                n_docs += 1
            tokens = 0
            for held_out, doc in enumerate(reversed(tail), 1):
                tokens += len(encode_document(tok, doc))
                if tokens >= need:
                    return n_docs, held_out
            if len(tail) == n_docs:
                raise OneBitInputError(
                    f"{self._what(whole)} has {tokens:,} tokens, fewer than the val_blocks="
                    f"{self._val_count()} blocks of seq_len={self.seq_len} to hold out for "
                    "validation; lower data.val_blocks or data.seq_len, or set data.val_path."
                )
            keep *= 8

    def _check_one_block(self, docs: LocalDocuments, tok: PreTrainedTokenizerBase) -> None:
        tokens = 0
        for doc in docs():
            tokens += len(encode_document(tok, doc))
            if tokens >= self.seq_len:
                return
        raise OneBitInputError(
            f"{self._what(docs)} has {tokens:,} tokens for training, fewer than one block of "
            f"seq_len={self.seq_len}."
        )

    def _materialise_val(self, tok: PreTrainedTokenizerBase) -> Tensor:
        """This rank's share (strided) of the first ``_val_count()`` validation blocks."""
        val_docs = self._split_sources(tok)[1]
        if val_docs is None:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        count, tokens = self._val_count(), 0

        def token_docs() -> Iterator[list[int]]:
            nonlocal tokens
            for doc in val_docs():
                ids = encode_document(tok, doc)
                tokens += len(ids)
                yield ids

        blocks = list(islice(pack_blocks(token_docs(), self.seq_len), count))
        if len(blocks) < count:
            raise OneBitInputError(
                f"{self._what(val_docs)} has {tokens:,} tokens, fewer than val_blocks={count} "
                f"blocks of seq_len={self.seq_len}; lower data.val_blocks or data.seq_len."
            )
        if count != self.val_blocks:
            warnings.warn(
                f"data.val_blocks={self.val_blocks} rounded up to {count}, a multiple of the world "
                "size, so that every rank validates on the same number of blocks.",
                stacklevel=2,
            )
        rank, world = self._rank_world()
        return torch.tensor(blocks, dtype=torch.long)[rank::world].contiguous()

    def calibration_blocks(self, n: int, seq_len: int | None = None) -> Tensor:
        """The first ``n`` blocks of the training text in source order, ``seq_len`` tokens each
        (None: ``calibration_seq_len``, else ``seq_len``), for calibration and the block-wise stage
        before training; read from a fresh pass, so the training stream's position is untouched.

        Shapes: → (at most n, seq_len) int64.
        """
        tok = self._resolve_tokenizer()
        length = seq_len or self.calibration_seq_len or self.seq_len
        fresh = PackedTextDataset(  # rank 0's view on every rank: the same calibration
            self._split_sources(tok)[0], tok, length, rank=0, world_size=1, name=self.name
        )
        return torch.stack([b["input_ids"] for b in islice(iter(fresh), n)]).long()

    # -- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> ResumableStreamLoader:
        """The training stream; the same loader (and data position) on every call."""
        if self._train_set is None:
            self.setup("fit")
        if self._train_loader is None:
            loader = ResumableStreamLoader(
                self._train_set,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                drop_last=True,
            )
            loader.consumed_batches = self._consumed_batches
            if self._pending_state is not None:
                loader.load_state_dict(self._pending_state)
                self._pending_state = None
            self._train_loader = loader
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self._val is None:
            self.setup("validate")
        if not self.val_blocks:
            return []
        return DataLoader(
            BlockDataset(self._val), batch_size=self.val_batch_size, collate_fn=collate_blocks
        )

    def _consumed_batches(self) -> int | None:
        # Lightning fetches one batch ahead; the loop's own count is what was really trained on.
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready

    # -- checkpointed data position ------------------------------------------------------------
    # Lightning also saves the train loader's own state_dict, but restores it only if the loader
    # was created after the checkpoint was read, which trainer.estimated_stepping_batches in
    # configure_optimizers prevents (Lightning issue #20550). The datamodule's state is read
    # before configure_optimizers (except with FSDP/DeepSpeed), so keeping it here too is enough.
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        if self._pending_state is not None:
            return {"train_loader": self._pending_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_state = state
