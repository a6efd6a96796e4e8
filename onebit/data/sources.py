"""Where documents come from: local text/JSON-lines/parquet files, or a data set on the Hub.

A *source* is a small picklable callable that returns a fresh iterator of documents (strings) each
time it is called, so every DataLoader worker and every pass over the data re-opens it.

Every source first yields *rows* (a line of a text file, the ``text_field`` of a JSON line, a
parquet row or a Hub row) and then groups rows into documents (``sample_by``):

- ``row``: each non-blank row is a document (JSON lines, parquet and Hub data sets by default);
- ``paragraph``: rows up to a blank row form a document (plain text files by default);
- ``article``: a WikiText top-level heading (`` = Title = ``) starts a new document and blank rows
  stay inside it (text files whose first non-blank line is such a heading, e.g. ``wiki.test.raw``);
- ``auto``: ``article`` or ``paragraph`` for text files (decided by the first non-blank line),
  ``row`` otherwise.

Text files are read with universal newlines, so CRLF line ends become LF. A document is its rows
joined by ``\\n`` without leading or trailing blank rows; one longer than ``MAX_DOC_CHARS`` is cut
at a row boundary so that a file without blank lines cannot become a single document that starves
every shard but one.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO

from torch.utils.data import get_worker_info

from onebit.errors import OneBitInputError, first_line
from onebit.hub import hub_reachable

SAMPLE_BY = ("auto", "row", "paragraph", "article")
TEXT_SUFFIXES = (".txt", ".raw")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
MAX_DOC_CHARS = 100_000
_PARQUET_BATCH_ROWS = 1024
_HUB_BATCH_ROWS = 256

# " = Robert Boulter = " is an article title; " = = Career = = " a section heading inside it.
_WIKITEXT_TITLE = re.compile(r"^ ?= [^=](?:.*[^=])? = ?$")


class HubUnavailableError(OneBitInputError, RuntimeError):
    """The Hugging Face Hub cannot be reached to stream a data set (the message names it)."""


def file_kind(path: Path) -> str | None:
    """``"text"``, ``"jsonl"`` or ``"parquet"`` by suffix (``.gz`` allowed except for parquet)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    name = name.removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def resolve_local_files(path: str | os.PathLike, key: str = "data.path") -> list[Path]:
    """The files a path names: one file, every supported file under a directory, or a glob.

    Several files are returned in sorted order, so the document order is deterministic.

    Raises:
        OneBitInputError: when nothing matches or a matched file has an unsupported suffix.
    """
    text = os.path.expanduser(os.fspath(path))
    p = Path(text)
    if any(c in text for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if os.path.isfile(f))
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_kind(f))
    elif p.is_file():
        files = [p]
    else:
        files = []
    if not files:
        raise OneBitInputError(f"{key}={os.fspath(path)!r} matches no file.")
    for f in files:
        if file_kind(f) is None:
            raise OneBitInputError(
                f"{f} is not a supported data file (.txt/.raw or .jsonl/.json, optionally .gz, "
                "or .parquet)."
            )
    return files


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Read the whole file (decompressed when ``.gz``) and refuse it at its first byte that is not
    UTF-8, so that a bad byte deep in a file stops the run before training, not hours into it.

    Raises:
        OneBitInputError: naming the file, the byte offset and the byte.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with _open_bytes(path) as f:
        while True:
            data = f.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.start counts from the pending bytes
                at = offset - pending + e.start
                what = " of its decompressed text" if path.name.lower().endswith(".gz") else ""
                raise OneBitInputError(
                    f"{path} is not UTF-8 text: byte {at:,}{what} (0x{e.object[e.start]:02x}) "
                    "cannot be decoded; convert the file to UTF-8 (e.g. iconv -f latin1 -t "
                    "utf-8) or leave it out of data.path."
                ) from None
            if not data:
                return
            offset += len(data)


def check_parquet_column(path: Path, text_field: str) -> None:
    """Refuse a parquet file without a ``text_field`` column of strings.

    Raises:
        OneBitInputError: naming the file, the column and what it holds.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:  # pyarrow's errors: not a parquet file, truncated footer
        first = first_line(e)
        raise OneBitInputError(f"{path} cannot be read as parquet: {first}") from None
    if text_field not in schema.names:
        raise OneBitInputError(
            f"{path} has no column {text_field!r} (data.text_field); its columns are "
            f"{', '.join(schema.names)}."
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise OneBitInputError(
            f"column {text_field!r} of {path} holds {kind}, not text (data.text_field names the "
            "column of strings to train on)."
        )


def check_local_files(files: Iterable[Path], text_field: str = "text") -> None:
    """Every check a data file can fail before training: text and JSON lines are UTF-8 from the
    first byte to the last, parquet has a column of strings named ``text_field``."""
    for f in files:
        if file_kind(f) == "parquet":
            check_parquet_column(f, text_field)
        else:
            check_utf8(f)


def _open_text(path: Path) -> IO[str]:
    # newline=None (universal newlines) turns CRLF and lone CR into LF.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def iter_file_rows(path: Path, text_field: str = "text") -> Iterator[str]:
    """The rows of one file: lines of a text file, ``text_field`` of JSON lines or parquet rows.

    Parquet is read in record batches of the one column, so a large file streams.
    """
    kind = file_kind(path)
    if kind == "text":
        with _open_text(path) as f:
            for line in f:
                yield line.rstrip("\n")
    elif kind == "jsonl":
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise OneBitInputError(
                        f"{path}:{lineno} is not valid JSON ({e.msg}); JSON lines (one object "
                        "per line) are expected."
                    ) from e
                value = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise OneBitInputError(
                        f"{path}:{lineno} has no string field {text_field!r} (data.text_field)."
                    )
                yield value
    elif kind == "parquet":
        import pyarrow.parquet as pq

        check_parquet_column(path, text_field)
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield value or ""
    else:
        raise OneBitInputError(f"{path} is not a supported data file.")


def group_rows(rows: Iterable[str], sample_by: str = "row") -> Iterator[str]:
    """Group rows into documents (see the module docstring); blank documents are dropped.

    Args:
        rows: rows of text; a trailing newline on a row is ignored.
        sample_by: ``row``, ``paragraph``, ``article``, or ``auto`` (``article`` when the first
            non-blank row is a WikiText title, else ``paragraph``).
    """
    if sample_by not in SAMPLE_BY:
        raise OneBitInputError(
            f"data.sample_by={sample_by!r} is not one of {', '.join(SAMPLE_BY)}."
        )
    if sample_by == "row":
        for row in rows:
            if row.strip():
                yield row.rstrip("\n")
        return
    mode = None if sample_by == "auto" else sample_by
    lines: list[str] = []
    chars = 0
    for row in rows:
        line = row.rstrip("\r\n")
        blank = not line.strip()
        if mode is None and not blank:
            mode = "article" if _WIKITEXT_TITLE.match(line) else "paragraph"
        boundary = (mode == "paragraph" and blank) or (
            mode == "article" and not blank and _WIKITEXT_TITLE.match(line) is not None
        )
        if boundary or chars > MAX_DOC_CHARS:
            yield from _join(lines)
            lines, chars = [], 0
        if not (mode == "paragraph" and blank):
            lines.append(line)
            chars += len(line) + 1
    yield from _join(lines)


def _join(lines: list[str]) -> Iterator[str]:
    # Drop blank rows at either end (not .strip(): WikiText lines keep their leading space).
    start, stop = 0, len(lines)
    while start < stop and not lines[start].strip():
        start += 1
    while stop > start and not lines[stop - 1].strip():
        stop -= 1
    if start < stop:
        yield "\n".join(lines[start:stop])


@dataclass(frozen=True)
class LocalDocuments:
    """Documents of local files (a path, a directory or a glob), optionally a slice of them.

    Calling it returns a fresh iterator. ``start``/``stop`` select documents by index over all
    files (used to hold out the tail of a file for validation).
    """

    path: str
    text_field: str = "text"
    sample_by: str = "auto"
    start: int = 0
    stop: int | None = None

    def __call__(self) -> Iterator[str]:
        files = resolve_local_files(self.path)
        return islice(self._documents(files), self.start, self.stop)

    def _documents(self, files: list[Path]) -> Iterator[str]:
        for f in files:
            mode = self.sample_by
            if mode == "auto" and file_kind(f) != "text":
                mode = "row"
            yield from group_rows(iter_file_rows(f, self.text_field), mode)

    def describe(self) -> str:
        part = (
            "" if (self.start, self.stop) == (0, None) else f" documents [{self.start}:{self.stop}]"
        )
        return f"{self.path}{part}"


@dataclass(frozen=True)
class HubDocuments:
    """Documents of a Hugging Face data set, streamed (``datasets.load_dataset(streaming=True)``).

    Calling it returns a fresh iterator; the Hub is probed first (a TCP connect with a timeout
    of ``timeout_s``), so offline it fails at once with :class:`HubUnavailableError`. Every caller
    gets *all* rows in order: iterated in a DataLoader worker, a ``datasets.IterableDataset`` would
    silently keep only that worker's share of the files, which would break our own sharding.
    """

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    sample_by: str = "auto"
    timeout_s: float = 3.0

    def __call__(self) -> Iterator[str]:
        check_hub(self.name, self.config, self.split, self.timeout_s)
        import datasets  # slow to import: only when streaming from the Hub

        if get_worker_info() is not None:
            # A forked worker inherits fsspec's lock of the parent's event loop (as datasets does).
            import fsspec.asyn

            fsspec.asyn.reset_lock()
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except ConnectionError as e:
            raise HubUnavailableError(
                f"Cannot stream {self._what()} from the Hugging Face Hub ({e}); "
                f"{_local_hint(self.name)}."
            ) from e
        if ds.column_names is not None and self.text_field not in ds.column_names:
            raise OneBitInputError(
                f"{self._what()} has no column {self.text_field!r} (data.text_field); its columns "
                f"are {', '.join(ds.column_names)}."
            )
        # .iter() reads every shard even in a DataLoader worker (plain iteration would not).
        batches = ds.select_columns([self.text_field]).iter(batch_size=_HUB_BATCH_ROWS)
        rows = (text or "" for batch in batches for text in batch[self.text_field])
        return group_rows(rows, "row" if self.sample_by == "auto" else self.sample_by)

    def _what(self) -> str:
        return _describe_hub(self.name, self.config, self.split)

    def describe(self) -> str:
        config = f"/{self.config}" if self.config else ""
        return f"hub:{self.name}{config}[{self.split}]"


def _describe_hub(name: str, config: str | None, split: str) -> str:
    config_part = f"config {config!r}, " if config else ""
    return f"data set {name!r} ({config_part}split {split!r})"


def _local_hint(name: str) -> str:
    stem = name.rsplit("/", 1)[-1]
    return (
        "to work offline use local files instead, e.g. "
        f"data.source=local data.path=/path/to/{stem}/*.parquet"
    )


def check_hub(name: str, config: str | None, split: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`HubUnavailableError` naming the data set unless the Hub is reachable.

    The probe (``onebit.hub.hub_reachable``) is one TCP connect, answered once per process; without
    it ``load_dataset`` retries for about 20 s offline before failing.
    """
    if not hub_reachable(timeout_s):
        raise HubUnavailableError(
            f"Cannot stream {_describe_hub(name, config, split)} because the Hugging Face Hub "
            "is unreachable or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
            f"{_local_hint(name)}."
        )
