"""Callbacks that record what a ``train.py`` run did, built from ``+callbacks.<name>._target_=``
overrides (in a subprocess too: ``tests`` is importable from the repository root)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class LossLog(L.Callback):
    """Appends ``{"rank", "step", "loss", "tokens"}`` per training batch to ``path``: the loss this
    rank computed on its own micro-batch (``step``: optimizer steps done before it)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = {
            "rank": trainer.global_rank,
            "step": trainer.global_step - 1,
            "loss": float(loss.detach()),
            "tokens": int(batch["input_ids"].numel()),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
