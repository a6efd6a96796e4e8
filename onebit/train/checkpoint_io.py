"""Lightning checkpoint I/O through ``onebit.checkpoint``: atomic writes with a checksum sidecar
and verified, pickle-free loading for ``ModelCheckpoint``'s files
(``Trainer(plugins=[AtomicCheckpointIO()])``)."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from onebit.checkpoint.single import _is_local, sidecar_path, write_checkpoint
from onebit.checkpoint.verify import load_checkpoint_file


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
