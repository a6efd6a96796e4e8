"""Files that are whole or absent: write to a temporary name beside the target, rename into place.

A process killed at any moment leaves the previous file (or none) and, at worst, a hidden
``.<name>.tmp<pid>`` that ``onebit.checkpoint.remove_stale_temporaries`` recognises; never half a
file under the real name. Plain Python: every layer may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The hidden temporary file beside ``path`` that this process writes first."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; when the block ends without error it
    is renamed over ``path`` (after an ``fsync`` with ``durable``), otherwise removed.

        with atomic_path(out / "cache.pt") as tmp:
            torch.save(blocks, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    """Write a small text file whole or not at all (:func:`atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)
