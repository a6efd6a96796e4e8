"""Resumable data position: a resumed loader (and a resumed Lightning run) continues exactly."""

from __future__ import annotations

import json
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from onebit.data import LocalDocuments, PackedTextDataset, ResumableStreamLoader, TextDataModule
from onebit.errors import OneBitInputError

from .conftest import make_documents


def _loader(path: Path, tok, num_workers: int, infinite: bool = True) -> ResumableStreamLoader:
    ds = PackedTextDataset(
        LocalDocuments(str(path)), tok, 16, infinite=infinite, rank=0, world_size=1
    )
    return ResumableStreamLoader(ds, batch_size=3, num_workers=num_workers)


def _ids(batches) -> list[list[int]]:
    return [b["input_ids"].tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(tok, docs_jsonl, num_workers: int) -> None:
    path, _ = docs_jsonl
    n, m = 5, 7
    reference = _ids(islice(_loader(path, tok, num_workers), n + m))
    first = _loader(path, tok, num_workers)
    assert _ids(islice(first, n)) == reference[:n]
    state = first.state_dict()
    resumed = _loader(path, tok, num_workers)
    resumed.load_state_dict(state)
    assert _ids(islice(resumed, m)) == reference[n:]
    # a second save/resume cycle keeps counting from the first
    again = _loader(path, tok, num_workers)
    again.load_state_dict(resumed.state_dict())
    assert _ids(islice(again, 2)) == _ids(islice(_loader(path, tok, num_workers), n + m + 2))[-2:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finite_pass_end_and_partial_worker_streams(tok, docs_jsonl, num_workers: int) -> None:
    path, _ = docs_jsonl
    whole = _ids(_loader(path, tok, num_workers, infinite=False))
    assert len(whole) > 8
    for n in (3, len(whole) - 1):  # mid-pass, and just before one worker runs out
        first = _loader(path, tok, num_workers, infinite=False)
        assert _ids(islice(first, n)) == whole[:n]
        resumed = _loader(path, tok, num_workers, infinite=False)
        resumed.load_state_dict(first.state_dict())
        assert _ids(resumed) == whole[n:]
    done = _loader(path, tok, num_workers, infinite=False)
    list(done)
    assert done.state_dict()["epoch"] == 1 and done.state_dict()["batches"] == 0
    assert _ids(done) == whole  # the next pass starts from the beginning


def test_consumed_batches_corrects_lookahead(tok, docs_jsonl) -> None:
    path, _ = docs_jsonl
    loader = _loader(path, tok, 0)
    it = iter(loader)
    for _ in range(4):
        next(it)  # the consumer has used 3; the 4th is prefetched
    loader.consumed_batches = lambda: 3
    state = loader.state_dict()
    assert state["batches"] == 3
    resumed = _loader(path, tok, 0)
    resumed.load_state_dict(state)
    assert _ids(islice(resumed, 1)) == _ids(islice(_loader(path, tok, 0), 4))[3:]


def test_mismatched_workers_are_refused(tok, docs_jsonl) -> None:
    path, _ = docs_jsonl
    state = _loader(path, tok, 2).state_dict()
    with pytest.raises(OneBitInputError, match=r"data\.num_workers=2; resume with the same value"):
        _loader(path, tok, 0).load_state_dict(state)


# -- through Lightning: checkpoint mid-run, resume, same batches as an uninterrupted run ----------
class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].tolist())
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        # As onebit.train.module does: this builds the train loader before the checkpoint is read.
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(
    path: Path,
    tok,
    tmp: Path,
    max_steps: int,
    num_workers: int,
    infinite: bool,
    ckpt: Path | None = None,
    every: int | None = None,
) -> list[list[int]]:
    dm = TextDataModule(
        name="tiny",
        source="local",
        path=str(path),
        seq_len=8,
        batch_size=2,
        val_blocks=0,
        num_workers=num_workers,
        infinite=infinite,
        shuffle_docs=0 if infinite else 6,
        seed=2,
        tokenizer=tok,
    )
    callbacks = []
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1 if infinite else 100,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp,
    )
    model = _Recorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen


@pytest.mark.parametrize(
    ("num_workers", "infinite", "n_docs", "save_at", "stop_at"),
    [(0, True, 40, 3, 7), (2, True, 40, 3, 7), (2, False, 6, 30, 34), (2, False, 6, 26, 29)],
)
def test_lightning_resume_continues_the_stream(
    tok, tmp_path: Path, num_workers: int, infinite: bool, n_docs: int, save_at: int, stop_at: int
) -> None:
    # finite (26 batches a pass): max_epochs makes configure_optimizers build the loader before
    # the checkpoint is read (Lightning #20550); saved in the second pass, and at the end of the
    # first; documents are shuffled per pass so that the passes differ
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(n_docs)))
    run = partial(_fit, path, tok, num_workers=num_workers, infinite=infinite)
    reference = run(tmp_path / "ref", stop_at)
    if not infinite:
        assert reference[26:] != reference[: stop_at - 26]  # the second pass is another order
    first = run(tmp_path / "a", save_at + 1, every=save_at)
    assert first == reference[: save_at + 1]
    ckpt = next((tmp_path / "a").glob(f"*step={save_at}.ckpt"))
    assert run(tmp_path / "b", stop_at, ckpt=ckpt) == reference[save_at:]


class _RankRecorder(_Recorder):
    """Writes what each rank trained on to ``out/rank{r}.json`` (forked ranks return nothing)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_train_end(self) -> None:
        path = self.out / f"rank{self.global_rank}.json"
        path.write_text(json.dumps(self.seen))


def _fit_ddp(path: Path, tok, out: Path, max_steps: int, ckpt: Path | None = None) -> list:
    out.mkdir(parents=True, exist_ok=True)
    dm = TextDataModule(
        name="tiny", source="local", path=str(path), seq_len=8, batch_size=2, val_blocks=3,
        num_workers=2, tokenizer=tok,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=2, strategy="ddp_fork",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1)],
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out,
    )  # fmt: skip
    trainer.fit(_RankRecorder(out), datamodule=dm, ckpt_path=ckpt)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_ranks_read_their_shards_and_resume_exactly(tok, docs_jsonl, tmp_path: Path) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("ddp_fork cannot start once CUDA is initialised in this process")
    path, _ = docs_jsonl
    reference = _fit_ddp(path, tok, tmp_path / "ref", 6)
    for rank in range(2):  # each rank reads its own shards: rank r of 2, 2 workers each
        ds = PackedTextDataset(LocalDocuments(str(path)), tok, 8, infinite=True, rank=rank,
                               world_size=2)  # fmt: skip
        loader = ResumableStreamLoader(ds, batch_size=2, num_workers=2)
        assert reference[rank] == _ids(islice(loader, 6))
    _fit_ddp(path, tok, tmp_path / "a", 3)
    resumed = _fit_ddp(path, tok, tmp_path / "b", 6, ckpt=tmp_path / "a" / "epoch=0-step=3.ckpt")
    assert resumed == [rank[3:] for rank in reference]
