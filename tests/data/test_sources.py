"""Document sources: local text/JSON-lines/parquet files, WikiText grouping, and the Hub offline."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader, get_worker_info

from onebit.data import PackedTextDataset, encode_document, sources
from onebit.data.sources import (
    HubDocuments,
    HubUnavailableError,
    LocalDocuments,
    group_rows,
    resolve_local_files,
)
from onebit.errors import OneBitInputError

from ..conftest import shared_path


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "*.parquet"
    with pytest.raises(OneBitInputError, match=re.escape(f"data.path='{missing}' matches no file")):
        resolve_local_files(missing)


def test_glob_and_directory_are_sorted(tmp_path: Path) -> None:
    for name in ["b.txt", "a.txt", "c.jsonl", "skip.csv"]:
        (tmp_path / name).write_text("x\n")
    assert resolve_local_files(tmp_path / "*.txt") == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert [f.name for f in resolve_local_files(tmp_path)] == ["a.txt", "b.txt", "c.jsonl"]
    with pytest.raises(OneBitInputError, match=r"skip\.csv is not a supported data file"):
        resolve_local_files(tmp_path / "*")


def test_text_file_paragraphs_and_crlf(tmp_path: Path) -> None:
    f = tmp_path / "plain.txt"
    f.write_bytes(b"first line\r\nsame doc\r\n\r\n\r\nsecond doc\r\n \r\nthird\r\n")
    assert list(LocalDocuments(str(f))()) == ["first line\nsame doc", "second doc", "third"]
    assert list(LocalDocuments(str(f), sample_by="row")()) == [
        "first line",
        "same doc",
        "second doc",
        "third",
    ]


def test_wikitext_articles(tmp_path: Path) -> None:
    f = tmp_path / "wiki.raw"
    f.write_text(
        " \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n Old . \n"
        " = Beta = \n Beta too . \n"
    )
    docs = list(LocalDocuments(str(f))())
    assert docs == [
        " = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n Old . ",
        " = Beta = \n Beta too . ",
    ]


def test_long_paragraph_is_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOC_CHARS", 20)
    rows = [f"line number {i}" for i in range(6)]  # 14 characters each, no blank line
    docs = list(group_rows(rows, "paragraph"))
    assert len(docs) == 3
    assert "\n".join(docs) == "\n".join(rows)


def test_jsonl_field_gzip_and_errors(tmp_path: Path) -> None:
    records = [{"body": "one"}, {"body": ""}, {"body": "two\nlines"}]
    f = tmp_path / "docs.jsonl.gz"
    with gzip.open(f, "wt") as out:
        out.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert list(LocalDocuments(str(f), text_field="body")()) == ["one", "two\nlines"]
    with pytest.raises(OneBitInputError, match=r"docs.jsonl.gz:1 has no string field 'text'"):
        list(LocalDocuments(str(f))())


def test_parquet_streams_row_groups(tmp_path: Path) -> None:
    texts = [f"document {i}" for i in range(50)]
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": texts, "id": list(range(50))}), f, row_group_size=7)
    assert list(LocalDocuments(str(f), text_field="content")()) == texts
    assert list(LocalDocuments(str(f), text_field="content", start=45, stop=48)()) == texts[45:48]
    with pytest.raises(OneBitInputError, match=r"has no column 'text'.*content, id"):
        list(LocalDocuments(str(f))())


def test_real_wikitext_raw() -> None:
    path = shared_path("data", "wikitext2", "wiki.test.raw")
    raw = path.read_bytes().decode("utf-8")
    titles = [ln for ln in raw.split("\r\n") if re.fullmatch(r" = [^=].* = ", ln)]
    docs = list(LocalDocuments(str(path))())
    assert len(docs) == len(titles) == 62
    assert [d.split("\n", 1)[0] for d in docs] == titles
    assert docs[0].startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    assert not any("\r" in d for d in docs)


def test_real_c4_parquet() -> None:
    path = shared_path("data", "c4", "c4_validation_2k.parquet")
    expected = pq.read_table(path, columns=["text"]).column("text").to_pylist()[:5]
    assert list(LocalDocuments(str(path), stop=5)()) == expected


# -- the Hub -----------------------------------------------------------------------------------
def test_hub_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    docs = HubDocuments("allenai/c4", "en", split="validation")
    with pytest.raises(HubUnavailableError) as info:
        next(iter(docs()))
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "'allenai/c4'" in msg and "split 'validation'" in msg
    assert "data.source=local data.path=/path/to/c4/*.parquet" in msg
    assert "\n" not in msg


def _hub_reachable_now() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    _hub_reachable_now(), reason="the Hub is reachable: this tests the offline path"
)
def test_real_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)  # restored after the test: the probe sets them
    getattr(sources.hub_reachable, "cache_clear", lambda: None)()  # ask the network again
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="'allenai/c4'"):
        next(iter(HubDocuments("allenai/c4", "en", split="validation")()))
    assert time.monotonic() - start < 30
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # nothing later waits on the network


def _fake_hub(files: list[str]):
    """``datasets.load_dataset`` that streams local parquet files instead of the Hub."""
    import datasets

    real = datasets.load_dataset

    def load_dataset(name, config=None, split="train", streaming=False):
        return real("parquet", data_files=files, split="train", streaming=True)

    return load_dataset


def _tag_worker(examples):
    # seq_len 1 and batch 1: one token per batch, tagged with the worker that produced it.
    return get_worker_info().id, int(examples[0]["input_ids"][0])


def test_hub_stream_is_not_resharded_in_workers(
    tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    texts = [f"Once upon a time, a cat number {i} sat." for i in range(12)]
    files = []
    for k in range(2):  # two files: datasets would give one to each of two workers
        files.append(str(tmp_path / f"part{k}.parquet"))
        pq.write_table(pa.table({"text": texts[k * 6 : (k + 1) * 6]}), files[-1])
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub(files))
    docs = HubDocuments("someone/tiny", split="train")
    assert list(docs()) == texts
    ds = PackedTextDataset(docs, tok, 1, rank=0, world_size=1)
    streams: dict[int, list[int]] = {0: [], 1: []}
    for worker, token in DataLoader(ds, batch_size=1, num_workers=2, collate_fn=_tag_worker):
        streams[worker].append(token)
    for worker in (0, 1):  # document i goes to worker i % 2, which reads both files
        expected = [
            t for i, d in enumerate(texts) if i % 2 == worker for t in encode_document(tok, d)
        ]
        assert streams[worker] == expected


@pytest.mark.parametrize("chunk", [7, 1 << 24])
def test_check_utf8_names_the_first_bad_byte(tmp_path: Path, chunk: int) -> None:
    """Offsets count bytes of the file (of its decompressed text for .gz), across read chunks
    and characters cut by them; a character cut short at the end is caught too."""
    from onebit.data.sources import check_utf8

    cases = [
        (("é" * 40).encode() + b"\xffabc", 80, "0xff"),
        (b"a" * 61_439 + "é".encode() + b"\xe9x", 61_441, "0xe9"),
        (("é" * 3).encode() + b"\xc3", 6, "0xc3"),
    ]
    for data, at, byte in cases:
        for name, write in (("t.txt", Path.write_bytes), ("t.txt.gz", None)):
            f = tmp_path / name
            if write is None:
                with gzip.open(f, "wb") as g:
                    g.write(data)
            else:
                f.write_bytes(data)
            with pytest.raises(
                OneBitInputError, match=rf"byte {at:,}( of its decompressed text)? \({byte}\)"
            ):
                check_utf8(f, chunk)
    (tmp_path / "ok.txt").write_bytes(("é" * 1000).encode())
    check_utf8(tmp_path / "ok.txt", chunk)


def test_a_parquet_column_that_is_not_text_is_refused(tmp_path: Path) -> None:
    from onebit.data.sources import check_local_files

    f = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), f)
    with pytest.raises(OneBitInputError) as e:
        check_local_files([f])
    assert str(e.value) == (
        f"column 'text' of {f} holds int64, not text (data.text_field names the column of "
        "strings to train on)."
    )
