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

:class:`AtomicCheckpointIO` plugs this into Lightning (``Trainer(plugins=[AtomicCheckpointIO()])``),
so ``ModelCheckpoint``'s ``last.ckpt`` and best checkpoints are written the same way.
:func:`find_resume_checkpoint` picks the newest good checkpoint of a directory (``ckpt_path=auto``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from onebit.errors import OneBitInputError, OneBitRunError

log = logging.getLogger("onebit.checkpoint")

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


@dataclass(frozen=True)
class CheckResult:
    """Is checkpoint ``path`` usable; ``reason`` says why not; ``global_step`` when known."""

    path: Path
    ok: bool
    reason: str | None = None
    global_step: int | None = None
    verified: bool = False  # a matching sidecar (else: opened without error)


_VERIFIED: dict[tuple[str, int, int], CheckResult] = {}


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


def check_checkpoint(path: str | os.PathLike) -> CheckResult:
    """Is ``path`` a complete, uncorrupted checkpoint? Reads the whole file once (cached per
    size and modification time). A directory is a sharded (FSDP2) checkpoint, checked against its
    manifest (:mod:`onebit.strategies`)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return CheckResult(path, False, "does not exist")
    key: tuple = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if path.is_dir():  # sharded: keyed by the size and time of every file in it
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir())
        key = (str(path.resolve()), tuple(files))
    if key in _VERIFIED:
        return _VERIFIED[key]
    if path.is_dir():
        from onebit.strategies import check_sharded

        ok, why, step = check_sharded(path)
        result = CheckResult(path, ok, why, step, verified=ok)
        if ok:
            _VERIFIED[key] = result
        return result
    meta = _read_sidecar(path)
    if meta is not None:
        step = meta.get("global_step")
        if st.st_size != meta["size"]:
            how = "truncated" if st.st_size < meta["size"] else "longer than written"
            return CheckResult(
                path, False, f"is {how} ({st.st_size:,} bytes, {meta['size']:,} written)", step
            )
        if f"{file_crc32(path):08x}" != meta["crc32"]:
            return CheckResult(
                path, False, "is corrupt (its CRC-32 differs from when written)", step
            )
        result = CheckResult(path, True, None, step, verified=True)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return CheckResult(path, False, f"cannot be read as a checkpoint ({first})")
        step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            return CheckResult(path, False, "is not a training checkpoint (no state_dict)")
        result = CheckResult(path, True, None, step, verified=False)
    _VERIFIED[key] = result
    return result


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify ``path`` and load it without executing code (``weights_only=True``).

    Raises:
        OneBitInputError: naming the file and what is wrong with it.
    """
    result = check_checkpoint(path)
    if not result.ok:
        raise OneBitInputError(f"checkpoint {path} {result.reason}.")
    if Path(path).is_dir():
        from onebit.strategies import consolidate

        return consolidate(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OneBitInputError(
            f"checkpoint {path} cannot be loaded safely (weights_only): {first}"
        ) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic writes with a checksum sidecar, verified safe loading.

    Remote (``scheme://``) paths fall back to Lightning's own I/O.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: Any = None
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if _is_local(path):
            sidecar_path(path).unlink(missing_ok=True)


def _candidates(directory: Path) -> list[Path]:
    # files, and directories (sharded checkpoints), never a temporary being written
    return sorted(p for p in directory.glob("*.ckpt") if not _TMP.match(p.name))


def _rank(path: Path, step: int | None) -> tuple:
    # newest step first; at one step prefer the periodic snapshot (saved at the end of a training
    # step, where resuming is exact), then last.ckpt, then the rest; then the newest file
    kind = (
        0 if re.fullmatch(r"step\d{8}\.ckpt", path.name) else 1 if path.name == "last.ckpt" else 2
    )
    return (-(step if step is not None else -1), kind, -path.stat().st_mtime_ns)


def _sharded_manifest(path: Path) -> dict[str, Any] | None:
    from onebit.strategies import read_manifest

    return read_manifest(path)


def find_resume_checkpoint(directory: str | os.PathLike) -> tuple[Path | None, list[CheckResult]]:
    """The newest good checkpoint in ``directory`` and the bad ones met on the way (newest first).

    Candidates are ordered by the training step their sidecar records (a file without one is
    opened to read it), and checked in that order until one is good.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None, []
    steps: dict[Path, int | None] = {}
    bad: list[CheckResult] = []
    for p in _candidates(directory):
        meta = _read_sidecar(p) if p.is_file() else _sharded_manifest(p)
        if meta is not None:
            steps[p] = meta.get("global_step")
            continue
        result = check_checkpoint(p)  # no sidecar: open it to learn its step
        if result.ok:
            steps[p] = result.global_step
        else:
            bad.append(result)  # unreadable, so of no known step: named whatever its rank
    for p in sorted(steps, key=lambda q: _rank(q, steps[q])):
        result = check_checkpoint(p)
        if result.ok:
            return p, bad
        bad.append(result)
    return None, bad


def _describe_bad(bad: list[CheckResult]) -> str:
    return "; ".join(f"{r.path.name} {r.reason}" for r in bad)


def resolve_ckpt_path(value: str | None, run_checkpoints: str | os.PathLike) -> Path | None:
    """The checkpoint a run resumes from, given ``ckpt_path``.

    * ``None``: none (a fresh run).
    * ``auto``: the newest good checkpoint in this run's checkpoint directory, or none when there
      is none yet (so that a requeued job with a fixed ``hydra.run.dir`` resumes, and its first
      start begins afresh). Corrupt ones are named in a warning and skipped; when every one is
      corrupt the run is refused rather than started over on top of them.
    * a directory (a run directory or its ``checkpoints/``): the newest good checkpoint in it.
    * a file: that checkpoint, verified.

    Raises:
        OneBitInputError: a named file or directory is missing, corrupt, or holds no good
            checkpoint; the sentence names the newest good one when there is one.
    """
    if value is None or value == "" or str(value).lower() in ("null", "none"):
        return None
    if str(value) == "auto":
        found, bad = find_resume_checkpoint(run_checkpoints)
        if found is None and bad:  # never start over on top of a run that cannot be read
            raise OneBitInputError(
                f"ckpt_path=auto found no usable checkpoint in {run_checkpoints}, only damaged "
                f"ones ({_describe_bad(bad)}); nothing was changed: resume from a good copy with "
                "ckpt_path=<file>, or move the damaged files away to start this run afresh."
            )
        if bad:
            log.warning(
                "skipping unusable checkpoint(s) in %s: %s", run_checkpoints, _describe_bad(bad)
            )
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s yet; starting a new run", run_checkpoints)
        else:
            log.info("ckpt_path=auto: resuming from %s", found)
        return found
    path = Path(value).expanduser()
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found, bad = find_resume_checkpoint(directory)
        if found is None:
            why = f" ({_describe_bad(bad)})" if bad else ""
            raise OneBitInputError(f"ckpt_path={value} holds no usable checkpoint{why}.")
        if bad:
            log.warning("skipping unusable checkpoint(s) in %s: %s", directory, _describe_bad(bad))
        return found
    if not path.exists():
        raise OneBitInputError(f"ckpt_path={value} does not exist.")
    result = check_checkpoint(path)
    if result.ok:
        return path
    found, _ = find_resume_checkpoint(path.parent)
    if found is None:
        hint = "there is no good checkpoint beside it"
    else:
        step = check_checkpoint(found).global_step
        hint = (
            f"the newest good one beside it is {found.name} (step {step}): pass it, or the "
            f"directory (ckpt_path={path.parent}) to take the newest good one"
        )
    raise OneBitInputError(f"ckpt_path={value} {result.reason}; {hint}.")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file by writing a temporary file and renaming it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
