"""Checkpoints that survive being killed: atomic writes, a checksum beside each file, safe loading.

Writing ``step00000040.ckpt``::

    .step00000040.ckpt.tmp<pid>    torch.save streams here; size and CRC-32 taken on the way
    fsync, remove the old sidecar, rename the file into place, then write
    step00000040.ckpt.meta.json    {"size", "crc32", "global_step", ...}, also atomically

A process killed at any moment leaves either the previous file or the new complete one (plus,
perhaps, a temporary file that is ignored and cleaned up later), never half a checkpoint under the
real name. A file whose sidecar disagrees with it (truncated, bit-flipped) is *corrupt*; a file
without a sidecar (killed between the two renames, or written elsewhere) is checked by opening it.
Loading is always ``torch.load(weights_only=True)``: no pickled code runs.

``onebit.train.checkpoint_io.AtomicCheckpointIO`` plugs this into Lightning, so
``ModelCheckpoint``'s ``last.ckpt`` and best checkpoints are written the same way. Checking and
loading either kind of checkpoint: :mod:`onebit.checkpoint.verify`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from onebit.errors import OneBitRunError

SIDECAR_SUFFIX = ".meta.json"
FORMAT = "onebit-checkpoint-v1"
_TMP = re.compile(r"^\..+\.tmp\d+$")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def sidecar_path(path: str | os.PathLike) -> Path:
    """The checksum file beside checkpoint ``path``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ChecksumWriter:
    """A write-only file wrapper that counts bytes and keeps their CRC-32 (zip's checksum).

    ``torch.save`` wraps errors of ``write`` in a ``RuntimeError``; the original ``OSError`` is kept
    in ``error`` so that a full disk can be reported as such.
    """

    def __init__(self, f) -> None:
        self.f, self.size, self.crc, self.error = f, 0, 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def write_failure_reason(error: OSError) -> str:
    """Why a write failed, for a one-sentence error: "the disk is full" or the OS's words."""
    return "the disk is full" if error.errno in _DISK_FULL else (error.strerror or str(error))


def _write_error(path: Path, error: OSError) -> OneBitRunError:
    reason = write_failure_reason(error)
    kept = (
        f"the previous {path.name} there is intact"
        if path.exists()
        else "no earlier checkpoint of that name existed"
    )
    return OneBitRunError(
        f"could not write checkpoint {path} ({reason}); nothing was replaced ({kept}, and the "
        "other checkpoints in that directory are untouched): free space and resume with "
        "ckpt_path=auto."
    )


def write_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Save ``checkpoint`` to ``path`` atomically, with its sidecar; returns the sidecar's content.

    Raises:
        OneBitRunError: the disk is full (or another OS error), naming the file; nothing under the
            real name was changed and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    side, side_tmp = sidecar_path(path), sidecar_path(tmp)
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _ChecksumWriter(f)
            torch.save(checkpoint, writer)
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "format": FORMAT,
            "file": path.name,
            "size": writer.size,
            "crc32": f"{writer.crc:08x}",
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(side_tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        # old sidecar first: a kill between the renames leaves a complete file without a sidecar
        # (checked by opening it), never a file with a sidecar that describes another one
        side.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(side_tmp, side)
        _fsync_dir(path.parent)
        return meta
    except BaseException as e:
        for p in (tmp, side_tmp):
            p.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else (writer.error if writer else None)
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from e
        raise


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of the file at ``path``, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by writes that a killed process never finished."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if _TMP.match(p.name) or (
                p.name.endswith(SIDECAR_SUFFIX) and _TMP.match(p.name[: -len(SIDECAR_SUFFIX)])
            ):
                if p.is_dir():  # a sharded checkpoint being written when the run died
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed
