"""Self-generated data: exact-length LLM-QAT sequences, cached once, split into train and val."""

from __future__ import annotations

import pytest
import torch

import onebit.data.self_generated as sg
from onebit.data.self_generated import SelfGeneratedDataModule, generate_sequences
from onebit.errors import OneBitInputError
from onebit.models import tiny_causal_lm

TINY = {"name": "tiny_llama", "source": "tiny", "arch": "llama"}


def test_sequences_have_exact_length_and_greedy_prefix() -> None:
    model = tiny_causal_lm("llama")
    seqs = generate_sequences(model, 6, 12, greedy_tokens=3, batch_size=4, seed=1, progress=False)
    assert seqs.shape == (6, 12) and seqs.dtype == torch.int32
    # tokens 1..3 are the teacher's greedy choices given the prefix
    with torch.no_grad():
        for t in range(1, 4):
            logits = model(seqs[:, :t].long()).logits[:, -1]
            assert torch.equal(logits.argmax(-1), seqs[:, t].long())
    again = generate_sequences(model, 6, 12, greedy_tokens=3, batch_size=4, seed=1, progress=False)
    assert torch.equal(seqs, again)  # reproducible for a seed


def test_first_token_avoids_excluded_ids() -> None:
    model = tiny_causal_lm("llama")
    seqs = generate_sequences(
        model, 32, 4, batch_size=32, exclude_tokens=list(range(0, 120)), progress=False
    )
    assert (seqs[:, 0] >= 120).all()


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch) -> None:
    calls = []
    real = sg.load_causal_lm
    monkeypatch.setattr(sg, "load_causal_lm", lambda spec: calls.append(1) or real(spec))
    kw = dict(num_sequences=8, val_sequences=2, seq_len=10, batch_size=2, cache_dir=str(tmp_path))
    dm = SelfGeneratedDataModule(TINY, **kw)
    dm.prepare_data()
    dm.setup()
    assert len(calls) == 1 and dm.cache_path.exists()
    assert not list(tmp_path.glob("*.tmp*"))  # written to a temporary name, then renamed
    dm2 = SelfGeneratedDataModule(TINY, **kw)  # a rerun: no generation
    dm2.prepare_data()
    dm2.setup()
    assert len(calls) == 1
    assert torch.equal(dm.train_blocks, dm2.train_blocks)
    assert dm.train_blocks.shape == (8, 10) and dm.val_blocks.shape == (2, 10)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 10) and batch["attention_mask"].all()
    # another setting is another cache entry
    assert SelfGeneratedDataModule(TINY, **{**kw, "seq_len": 11}).cache_path != dm.cache_path


def test_calibration_sequences_join_consecutive_generated_ones(tmp_path) -> None:
    kw = dict(num_sequences=8, val_sequences=0, seq_len=10, batch_size=2, cache_dir=str(tmp_path))
    dm = SelfGeneratedDataModule(TINY, **kw, calibration_seq_len=25)
    dm.prepare_data()
    dm.setup()
    calib = dm.calibration_blocks(3)
    assert calib.shape == (3, 25) and calib.dtype == torch.long
    assert torch.equal(calib.flatten(), dm.train_blocks.long().flatten()[:75])
    assert torch.equal(dm.calibration_blocks(2, seq_len=10), dm.train_blocks[:2].long())
    with pytest.raises(
        OneBitInputError, match=r"data\.calibration_seq_len=81 is longer than the 80"
    ):
        dm.calibration_blocks(1, seq_len=81)
    with pytest.raises(OneBitInputError, match=r"data\.calibration_seq_len=0 "):
        SelfGeneratedDataModule(TINY, **kw, calibration_seq_len=0)
