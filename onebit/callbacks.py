"""Callbacks of the training application."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class OneBitCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two saves.

    A run stopped by ``max_steps`` at a step that is not a multiple of ``every_n_train_steps`` (or
    not a validation step) would otherwise leave ``last.ckpt`` behind the weights it exports.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None:
            return
        if self._last_global_step_saved == trainer.global_step:
            return
        path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(path)
        self.last_model_path = path
        self._last_global_step_saved = trainer.global_step
