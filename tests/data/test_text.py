"""Tokenising and packing: exact blocks, sharding over ranks and workers, DataModule, configs."""

from __future__ import annotations

import json
import re
from itertools import chain, islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, get_worker_info

from onebit.data import (
    HubUnavailableError,
    LocalDocuments,
    PackedTextDataset,
    TextDataModule,
    encode_document,
    pack_blocks,
)
from onebit.data import sources as sources_module
from onebit.errors import OneBitInputError

from ..conftest import REPO, shared_path
from .conftest import make_documents


def _stream(tok, docs: list[str]) -> list[int]:
    """The expected token stream: each document's ids, then EOS."""
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_pack_blocks_cuts_exact_blocks_and_drops_tail() -> None:
    blocks = list(pack_blocks([[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]], 4))
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_encode_document_appends_eos_without_bos(tok) -> None:
    ids = encode_document(tok, "Once upon a time")
    assert ids[-1] == tok.eos_token_id and ids[0] != tok.bos_token_id
    assert ids[:-1] == tok("Once upon a time", add_special_tokens=False)["input_ids"]


def test_blocks_are_the_tokenised_documents_with_eos(tok, docs_jsonl) -> None:
    path, docs = docs_jsonl
    seq_len = 37
    ds = PackedTextDataset(LocalDocuments(str(path)), tok, seq_len, rank=0, world_size=1)
    examples = list(ds)
    expected = _stream(tok, docs)
    assert len(examples) == len(expected) // seq_len > 5
    for ex in examples:
        assert ex["input_ids"].shape == (seq_len,) and ex["input_ids"].dtype == torch.long
        assert torch.equal(ex["attention_mask"], torch.ones(seq_len, dtype=torch.long))
    got = torch.cat([ex["input_ids"] for ex in examples]).tolist()
    assert got == expected[: len(got)]


def test_infinite_stream_reads_the_source_again(tok, docs_jsonl) -> None:
    path, docs = docs_jsonl
    ds = PackedTextDataset(LocalDocuments(str(path)), tok, 64, infinite=True, rank=0, world_size=1)
    expected = _stream(tok, docs) * 3
    n = len(expected) // 64
    got = torch.cat([ex["input_ids"] for ex in islice(ds, n)]).tolist()
    assert got == expected[: n * 64]


def _tag_worker(examples):
    # seq_len 1 and batch 1: one token per batch, tagged with the worker that produced it.
    return get_worker_info().id, int(examples[0]["input_ids"][0])


def test_sharding_two_ranks_two_workers_covers_each_document_once(tok, docs_jsonl) -> None:
    path, docs = docs_jsonl
    eos = tok.eos_token_id
    encoded = {tuple(encode_document(tok, d)): i for i, d in enumerate(docs)}
    assert len(encoded) == len(docs)  # documents are distinguishable by their tokens
    seen: dict[int, list[int]] = {}  # shard -> document indices in order
    for rank in range(2):
        ds = PackedTextDataset(LocalDocuments(str(path)), tok, 1, rank=rank, world_size=2)
        streams: dict[int, list[int]] = {0: [], 1: []}
        for worker, token in DataLoader(ds, batch_size=1, num_workers=2, collate_fn=_tag_worker):
            streams[worker].append(token)
        for worker, stream in streams.items():
            pieces, cur = [], []
            for t in stream:  # seq_len 1 drops nothing: split the stream back at EOS
                cur.append(t)
                if t == eos:
                    pieces.append(tuple(cur))
                    cur = []
            assert cur == []
            seen[rank * 2 + worker] = [encoded[p] for p in pieces]
    for shard, indices in seen.items():
        assert indices == [i for i in range(len(docs)) if i % 4 == shard]
    assert sorted(chain.from_iterable(seen.values())) == list(range(len(docs)))


def test_shard_without_documents_fails_clearly(tok, tmp_path: Path) -> None:
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(3)))
    ds = PackedTextDataset(LocalDocuments(str(path)), tok, 8, infinite=True, rank=3, world_size=4)
    with pytest.raises(OneBitInputError, match=r"Shard 3 of 4 .* got no document"):
        next(iter(ds))


def test_shuffle_docs_is_a_seeded_windowed_permutation(tok, docs_jsonl) -> None:
    path, docs = docs_jsonl
    ds = PackedTextDataset(LocalDocuments(str(path)), tok, 8, shuffle_docs=16, seed=1)
    order0, order1 = list(ds.ordered_documents(0)), list(ds.ordered_documents(1))
    assert order0 == list(ds.ordered_documents(0)) != order1
    for start in range(0, 40, 16):  # a permutation of each window
        assert sorted(order0[start : start + 16]) == sorted(docs[start : start + 16])
    assert order0 != docs


# -- TextDataModule ------------------------------------------------------------------------------
def _dm(path: Path | str, tok, **kw) -> TextDataModule:
    kw = {"seq_len": 32, "batch_size": 4, "val_blocks": 6, "tokenizer": tok, **kw}
    return TextDataModule(name="tiny", source="local", path=str(path), **kw)


def test_local_holdout_is_the_tail_and_fixed(tok, docs_jsonl) -> None:
    path, docs = docs_jsonl
    dm = _dm(path, lambda: tok)  # a factory, resolved in setup
    dm.setup("fit")
    train, val = dm._split_sources(tok)
    assert train.stop == val.start and val.stop is None  # disjoint: training stops where val starts
    held_out = docs[val.start :]
    expected = _stream(tok, held_out)
    assert 6 * 32 <= len(expected) < 6 * 32 + len(encode_document(tok, held_out[0]))
    first = [b["input_ids"] for b in dm.val_dataloader()]
    again = [b["input_ids"] for b in dm.val_dataloader()]
    assert [b.shape for b in first] == [(4, 32), (2, 32)]
    assert torch.equal(torch.cat(first), torch.cat(again))
    assert torch.cat(first).flatten().tolist() == expected[: 6 * 32]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 32)
    assert batch["input_ids"].flatten().tolist() == _stream(tok, docs[: val.start])[: 4 * 32]


def test_val_path_and_world_size_rounding(tok, docs_jsonl, tmp_path: Path) -> None:
    path, docs = docs_jsonl
    val_file = tmp_path / "val.parquet"
    pq.write_table(pa.table({"text": docs[::-1]}), val_file)
    dm = _dm(path, tok, val_path=str(val_file), val_blocks=5)
    dm._rank_world = lambda: (1, 3)  # rank 1 of 3
    with pytest.warns(UserWarning, match="rounded up to 6"):
        dm.setup("validate")
    all_blocks = torch.tensor(
        list(islice(pack_blocks(map(lambda d: encode_document(tok, d), docs[::-1]), 32), 6))
    )
    assert torch.equal(dm._val, all_blocks[1::3])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_real_c4_and_wikitext(tok, num_workers: int) -> None:
    for parts in [("c4", "c4_validation_2k.parquet"), ("wikitext2", "wiki.test.raw")]:
        path = shared_path("data", *parts)
        dm = _dm(path, tok, seq_len=128, val_blocks=8, num_workers=num_workers)
        dm.setup("fit")
        batches = list(islice(dm.train_dataloader(), 3))
        assert [b["input_ids"].shape for b in batches] == [(4, 128)] * 3
        assert dm._val.shape == (8, 128)
        assert int(min(b["input_ids"].min() for b in batches)) >= 0
        assert int(max(b["input_ids"].max() for b in batches)) < len(tok)


def test_too_short_data_set_names_it(tok, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("Once upon a time.\n\nThe end.\n")
    n = len(encode_document(tok, "Once upon a time.")) + len(encode_document(tok, "The end."))
    with pytest.raises(OneBitInputError) as info:
        _dm(path, tok, val_blocks=0, seq_len=64).setup("fit")
    assert re.search(
        rf"data set 'tiny' \(.*short.txt\) has {n} tokens.*seq_len=64", str(info.value)
    )
    with pytest.raises(OneBitInputError, match=rf"has {n} tokens, fewer than the val_blocks=2"):
        _dm(path, tok, val_blocks=2, seq_len=64).setup("fit")


def test_missing_path_and_bad_values(tok, tmp_path: Path) -> None:
    with pytest.raises(OneBitInputError, match=r"data\.path='.*nowhere\.txt' matches no file"):
        _dm(tmp_path / "nowhere.txt", tok).setup("fit")
    with pytest.raises(OneBitInputError, match=r"data\.seq_len=0 must be an integer >= 1"):
        _dm(tmp_path, tok, seq_len=0)
    with pytest.raises(OneBitInputError, match=r"data\.source='s3' is not one of local, hub"):
        TextDataModule(source="s3")
    with pytest.raises(OneBitInputError, match=r"data\.path must name local files"):
        TextDataModule(source="local")
    with pytest.raises(OneBitInputError, match="needs a tokenizer"):
        _dm(tmp_path, None).setup("fit")


def test_hub_offline_fails_in_setup(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_module, "hub_reachable", lambda timeout=3.0: False)
    dm = TextDataModule(
        name="c4", source="hub", hub_name="allenai/c4", hub_config="en", tokenizer=tok
    )
    with pytest.raises(HubUnavailableError, match=r"data set 'allenai/c4' \(config 'en', split"):
        dm.setup("fit")


# -- Hydra configs -------------------------------------------------------------------------------
def _data_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """``cfg.data`` of the real train config with ``data=name`` (so ``${seed}`` resolves)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={name}", *overrides])
    return cfg.data


@pytest.mark.parametrize(
    ("name", "hub_name"), [("c4", "allenai/c4"), ("wikitext", "Salesforce/wikitext")]
)
def test_configs_compose_and_build(tok, name: str, hub_name: str) -> None:
    dm = instantiate(_data_config(name), tokenizer=tok)
    assert isinstance(dm, TextDataModule)
    assert (dm.source, dm.hub_name, dm.path, dm.seed) == ("hub", hub_name, None, 0)


def test_config_local_override(tok) -> None:
    path = shared_path("data", "c4", "c4_validation_2k.parquet")
    overrides = [
        "data.source=local",
        f"data.path={path}",
        "data.seq_len=64",
        "data.val_blocks=4",
        "data.num_workers=0",
    ]
    cfg = _data_config("c4", overrides)
    dm = instantiate(cfg, tokenizer=tok)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (cfg.batch_size, 64)


def test_calibration_blocks_are_the_first_training_blocks_and_leave_the_stream(
    tok, docs_jsonl
) -> None:
    path, docs = docs_jsonl
    dm = _dm(path, tok, shuffle_docs=4)
    dm.setup("fit")
    _, val = dm._split_sources(tok)
    calib = dm.calibration_blocks(3)
    assert calib.shape == (3, 32) and calib.dtype == torch.long
    assert calib.flatten().tolist() == _stream(tok, docs[: val.start])[: 3 * 32]  # source order
    loader = dm.train_dataloader()
    first = next(iter(loader))["input_ids"]
    dm.calibration_blocks(3)  # reading them again does not move the training stream
    fresh = _dm(path, tok, shuffle_docs=4)
    fresh.setup("fit")
    assert torch.equal(next(iter(fresh.train_dataloader()))["input_ids"], first)


def test_calibration_at_its_own_length_cuts_the_same_text(tok, docs_jsonl) -> None:
    """data.calibration_seq_len: calibration sequences of that length from the same text, in
    source order; the block-wise stage asks for the training length."""
    path, docs = docs_jsonl
    dm = _dm(path, tok, calibration_seq_len=80)
    dm.setup("fit")
    _, val = dm._split_sources(tok)
    calib = dm.calibration_blocks(2)
    assert calib.shape == (2, 80) and calib.dtype == torch.long
    assert calib.flatten().tolist() == _stream(tok, docs[: val.start])[: 2 * 80]
    assert dm.calibration_blocks(3, seq_len=dm.seq_len).shape == (3, 32)
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 32)  # training: seq_len
    with pytest.raises(OneBitInputError, match=r"data\.calibration_seq_len=0 "):
        _dm(path, tok, calibration_seq_len=0)


def test_a_bad_byte_deep_in_a_local_file_fails_the_preflight(tok, docs_jsonl, tmp_path) -> None:
    """A byte that is not UTF-8 60 KB into the file stops the run before training, naming the
    file and the byte offset (it used to kill training when the stream reached it)."""
    path, _ = docs_jsonl
    good = path.read_bytes()
    docs = [json.dumps({"text": "word " * 200}) + "\n" for _ in range(80)]  # ~80 KB
    body = "".join(docs).encode()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(body[:61_440] + b"\xff" + body[61_440:])
    dm = _dm(bad, tok)
    with pytest.raises(OneBitInputError) as e:
        dm.preflight()
    assert str(e.value) == (
        f"{bad} is not UTF-8 text: byte 61,440 (0xff) cannot be decoded; convert the file to "
        "UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of data.path."
    )
    _dm(path, tok).preflight()  # the good file passes
    assert path.read_bytes() == good
