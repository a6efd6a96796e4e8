"""Which checkpoints are usable, loading them safely, and which one a run resumes from.

A checkpoint is one file with its checksum sidecar (:mod:`onebit.checkpoint.single`) or a sharded
directory with its manifest (:mod:`onebit.checkpoint.sharded`). :func:`check_checkpoint` checks
either (cached per size and modification time), :func:`load_checkpoint_file` loads either without
running pickled code, :func:`find_resume_checkpoint` picks the newest good one of a directory
(``ckpt_path=auto``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onebit.checkpoint.sharded import check_sharded, read_manifest, to_full_checkpoint
from onebit.checkpoint.single import _TMP, _read_sidecar, file_crc32
from onebit.errors import OneBitInputError, first_line

log = logging.getLogger("onebit.checkpoint")


@dataclass(frozen=True)
class CheckResult:
    """Is checkpoint ``path`` usable; ``reason`` says why not; ``global_step`` when known."""

    path: Path
    ok: bool
    reason: str | None = None
    global_step: int | None = None
    verified: bool = False  # a matching sidecar (else: opened without error)


_VERIFIED: dict[tuple[str, int, int], CheckResult] = {}


def check_checkpoint(path: str | os.PathLike) -> CheckResult:
    """Is ``path`` a complete, uncorrupted checkpoint? Reads the whole file once (cached per
    size and modification time). A directory is a sharded (FSDP2) checkpoint, checked against its
    manifest (:mod:`onebit.checkpoint.sharded`)."""
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
            first = first_line(e)
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
        return consolidate(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = first_line(e)
        raise OneBitInputError(
            f"checkpoint {path} cannot be loaded safely (weights_only): {first}"
        ) from e


def consolidate(directory: str | os.PathLike) -> dict[str, Any]:
    """The full checkpoint of sharded ``directory`` as one ordinary dict (``state_dict`` holds
    full tensors), in this process, without a process group. Verified against its manifest first.

    Raises:
        OneBitInputError: the checkpoint is incomplete or corrupt, naming the file.
    """
    result = check_checkpoint(directory)  # cached: free when the caller checked it already
    if not result.ok:
        raise OneBitInputError(f"checkpoint {directory} {result.reason}.")
    return to_full_checkpoint(Path(directory))


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
        meta = _read_sidecar(p) if p.is_file() else read_manifest(p)
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
