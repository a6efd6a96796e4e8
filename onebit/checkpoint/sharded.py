"""Sharded (FSDP2) checkpoints as files: a directory with one ``.distcp`` file per rank written by
``torch.distributed.checkpoint``, Lightning's ``meta.pt`` (hyper-parameters, loops, step) and our
``onebit-manifest.json`` (size and CRC-32 of every file, the step). The strategy that writes them
is ``onebit.train.parallel.FSDP2Strategy``; reading them needs no process group.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from onebit.checkpoint.single import file_crc32
from onebit.fileio import atomic_write_text

LIGHTNING_META = "meta.pt"  # lightning.fabric.strategies.model_parallel._METADATA_FILENAME
MANIFEST = "onebit-manifest.json"
FORMAT = "onebit-sharded-checkpoint-v1"


def write_manifest(directory: Path, global_step: int | None) -> dict[str, Any]:
    """Record size and CRC-32 of every file of sharded checkpoint ``directory``."""
    files = {
        p.name: {"size": p.stat().st_size, "crc32": f"{file_crc32(p):08x}"}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    meta = {
        "format": FORMAT,
        "global_step": global_step,
        "files": files,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(directory / MANIFEST, json.dumps(meta), durable=True)
    return meta


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def check_sharded(directory: Path) -> tuple[bool, str | None, int | None]:
    """(ok, why not, global step) of sharded checkpoint ``directory``; reads every file once."""
    meta = read_manifest(directory)
    if meta is None:
        return False, f"is a directory without a readable {MANIFEST} (an incomplete write)", None
    step = meta.get("global_step")
    for name, want in meta["files"].items():
        p = directory / name
        if not p.is_file():
            return False, f"lacks its shard file {name}", step
        size = p.stat().st_size
        if size != want["size"]:
            return False, f"has {name} of {size:,} bytes, {want['size']:,} written", step
        if f"{file_crc32(p):08x}" != want["crc32"]:
            return False, f"has a corrupt {name} (its CRC-32 differs from when written)", step
    return True, None, step


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def sharded_hyper_parameters(directory: Path) -> dict[str, Any]:
    """Lightning's non-tensor checkpoint content (``meta.pt``: hyper-parameters, loops, step)."""
    return torch.load(directory / LIGHTNING_META, map_location="cpu", weights_only=True)


def sharded_shapes(directory: Path, prefix: str = "state_dict.") -> dict[str, tuple]:
    """``{key: shape}`` of the model state in sharded checkpoint ``directory`` (metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {
        k[len(prefix) :]: tuple(v.size)
        for k, v in md.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }


def to_full_checkpoint(directory: Path) -> dict[str, Any]:
    """The full checkpoint of sharded ``directory`` as one ordinary dict (``state_dict`` holds
    full tensors), in this process, without a process group; not verified (that is
    ``onebit.checkpoint.consolidate``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp = directory.parent / f".{directory.name}.consolidated.tmp{os.getpid()}"
    try:
        dcp_to_torch_save(str(directory), str(tmp))
        state = torch.load(tmp, map_location="cpu", weights_only=True)
    finally:
        tmp.unlink(missing_ok=True)
    return {**sharded_hyper_parameters(directory), **state}
