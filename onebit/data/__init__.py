"""Data modules: packed text from C4/WikiText or local files, and self-generated distillation data.

Names are imported on first use, so ``import onebit.data`` stays cheap (no Lightning, no
``datasets``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlockDataset": "onebit.data.text",
    "PackedTextDataset": "onebit.data.text",
    "TextDataModule": "onebit.data.text",
    "encode_document": "onebit.data.text",
    "pack_blocks": "onebit.data.text",
    "HubDocuments": "onebit.data.sources",
    "HubUnavailableError": "onebit.data.sources",
    "LocalDocuments": "onebit.data.sources",
    "group_rows": "onebit.data.sources",
    "resolve_local_files": "onebit.data.sources",
    "ResumableStreamLoader": "onebit.data.stream",
    "StreamPosition": "onebit.data.stream",
    "collate_blocks": "onebit.data.stream",
    "SelfGeneratedDataModule": "onebit.data.self_generated",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
